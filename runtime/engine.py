"""The run-side contract every engine backend satisfies (Polygraphy's BaseRunner is the model).

`Engine` owns what all backends share: the component's name and spec, the engine's profile limits
(from the manifest), the input check, the output order, release and the context manager, and the
check that an engine may run on this machine. A backend's run module defines one subclass, registered
in runtime/registry.py, that supplies only:
- `_open(entry, options, context)`: open the engine file (`self.path`);
- `_infer(feeds) -> list of outputs`;
- `_release()`, if it holds resources;
- `open_context()` (classmethod), if its engines share something within one pipeline (a CUDA stream);
- `machine_problem(entry)` (classmethod), if "built for this machine" means more than the same target
  and library versions.
Lifecycle: construct (load) → call any number of times (infer) → release (or leave a `with` block).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from sprintrt import machine
from sprintrt import specs as S
from sprintrt.defaults import MAX_THREADS_PER_CPU
from sprintrt.errors import EngineDirError, InvalidInputError, MissingDependencyError
from sprintrt.manifest import Manifest


@dataclass(frozen=True)
class RunOptions:
    """How engines are opened: intra-op threads (None: the backend's own choice, one per core, unless
    $SPRINTRT_THREADS says otherwise), for GPU engines with static shapes, CUDA-graph replay, and whether an
    engine with a compiled-model cache beside it (OpenVINO's blobs) is loaded through it, reading the compiled
    model or compiling and writing it (False: compiled in memory only, the tuner's candidates)."""

    threads: int | None = None
    cuda_graph: bool = False
    compiled_cache: bool = True

    def __post_init__(self):
        threads = self.threads if self.threads is not None else _env_threads()
        top = max_threads()
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or not 1 <= threads <= top):
            raise InvalidInputError(f"threads={threads!r} is not allowed: expected an integer in [1, {top}] "
                                    f"({MAX_THREADS_PER_CPU} per CPU this process may use: {usable_cpus()}), or None "
                                    "for the backend's choice (one per core). Fix: pass e.g. --threads 2, or leave it "
                                    "out")
        object.__setattr__(self, "threads", threads)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def max_threads() -> int:
    """The most intra-op threads an engine may be given (defaults.MAX_THREADS_PER_CPU per usable CPU)."""
    return MAX_THREADS_PER_CPU * usable_cpus()


def _env_threads() -> int | None:
    value = os.environ.get("SPRINTRT_THREADS")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"SPRINTRT_THREADS={value!r} is not an integer. Fix: export SPRINTRT_THREADS=2, "
                                "or unset it") from None


def profile_limits(manifest: Manifest, component: str) -> dict[str, S.Bounds]:
    """The engine's dim ranges as built (its shape profile), from the manifest."""
    dims = manifest.components[component]["io"]["dims"]
    return {name: S.Bounds(d["min"], d["opt"], d["max"]) for name, d in dims.items()}


def component_spec(manifest: Manifest, component: str) -> S.ComponentSpec:
    return S.SPEC_BUILDERS[component](S.ModelDims.from_json(manifest.data["model_dims"]))


class Engine:
    """One loaded engine of one component: `engine(**feeds) -> {output name: array}`."""

    def __init__(self, manifest: Manifest, component: str, options: RunOptions | None = None, context=None):
        entry = manifest.components[component]
        self.name = component
        self.spec = component_spec(manifest, component)
        self.limits: dict[str, S.Bounds] = profile_limits(manifest, component)
        self.backend: str = entry["backend"]
        self.path = manifest.component_file(component)
        self.output_names = [t.name for t in self.spec.outputs]
        self.rebuild = (f"Fix: rebuild with `sprintrt build ONNX_DIR -o ENGINE_DIR --backend {self.backend} --rebuild` "
                        "on this machine")
        self._released = False
        self._open(entry, options or RunOptions(), context)

    # ---- what a backend supplies --------------------------------------------------------------
    @classmethod
    def open_context(cls):
        """What this backend's engines share within one pipeline (e.g. a CUDA stream); None: nothing."""
        return None

    @classmethod
    def machine_problem(cls, entry: Mapping) -> str | None:
        """Why the engine of a manifest entry cannot run here, or None. Default: it must have been built for
        this very target (CPU ISA, or GPU and compute capability) with the library versions this process has."""
        try:
            here = machine.current_target(entry["target"]["kind"])
        except MissingDependencyError as e:
            raise MissingDependencyError(f"{e}, and the {entry['backend']} engines need one. Fix: run them on the "
                                         "machine they were built for, or build engines for this one (`sprintrt build "
                                         "ONNX_DIR -o ENGINE_DIR --backend auto`)") from None
        if entry["target"] != here:
            return f"was built for {entry['target']}, this machine is {here}"
        return cls.library_problem(entry)

    @staticmethod
    def library_problem(entry: Mapping) -> str | None:
        """Why this process's engine library cannot run the entry's engine (another version built it), or None."""
        for lib, built_with in entry.get("libraries", {}).items():
            have = machine.library_version(lib)
            if have is not None and have != built_with:
                return f"was built with {lib} {built_with}, this process has {lib} {have}"
        return None

    def _open(self, entry: dict, options: RunOptions, context) -> None:
        """Open the engine file `self.path` (its manifest entry says how it was built)."""
        raise NotImplementedError

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the engine on checked feeds; outputs in spec order, owned by the caller."""
        raise NotImplementedError

    def _release(self) -> None:
        pass

    # ---- what every engine does -----------------------------------------------------------------
    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if self._released:
            raise EngineDirError(f"the {self.name} engine was released. Fix: load the engines again "
                                 "(SprintPipeline.from_engines)")
        self.spec.check_feeds(feeds, self.limits)
        outs = self._infer({t.name: feeds[t.name] for t in self.spec.inputs})
        return dict(zip(self.output_names, outs))

    def release(self) -> None:
        """Free the engine's resources; calling it again does nothing."""
        if not self._released:
            self._release()
            self._released = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
