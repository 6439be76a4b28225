"""The build-side contract every engine backend module satisfies, and the registry of backends.

A backend module (engines/ort_build.py, ov_build.py, trt_build.py) turns one ONNX file into one engine
file for this machine and declares what it builds (BuildBackend below). `engines/build.py` only
orchestrates (read the export, resolve precisions, reuse or build, verify every file, write the
manifest); the CLI, the tuner, `doctor` and the benchmarks look backends up here and name none.
Adding a backend adds one line to BUILD_BACKENDS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

from sprintrt.errors import InvalidInputError, MissingDependencyError

# Backend name → (its build module, the short names the CLI and the benchmark accept), in the order
# `--backend` lists them (and the tuner tries them).
BUILD_BACKENDS = {
    "onnxruntime": ("sprintrt.engines.ort_build", ("ort",)),
    "openvino": ("sprintrt.engines.ov_build", ("ov",)),
    "tensorrt": ("sprintrt.engines.trt_build", ("trt",)),
    "tensorrt-rtx": ("sprintrt.engines.rtx_build", ("rtx",)),
}
ALIASES = {alias: name for name, (_, aliases) in BUILD_BACKENDS.items() for alias in aliases}
AUTO = "auto"


@dataclass(frozen=True)
class BuildResult:
    """What building one component produced besides the engine file itself."""

    info: dict  # manifest fields the backend adds (execution provider, how to open it at run time, ...)
    extra_files: tuple[Path, ...] = field(default=())  # files the engine needs beside it, verified like it


class BuildBackend(Protocol):
    """One engine backend. Modules satisfy it structurally (module-level names); the parameter names
    below are the modules' own (tests/engines/test_registry.py calls every module with them)."""

    NAME: str  # the --backend name, recorded in the manifest
    LIBRARY: str  # the library whose version is in the engine key
    SUFFIX: str  # the engine file's suffix
    DEVICE: str  # "cpu" or "gpu": what the engines run on (the tuner times the CPU backends)
    # {component: the precisions this backend builds for it}; the first is not a default (see default_precisions)
    ALLOWED: Mapping
    TYPED_PRECISIONS: frozenset  # precisions built from the export's typed variant, not the fp32 graph
    # precisions whose 16-bit graph (the typed variant itself, or the base int8w weights are compressed in) is
    # used when the export has it, else the fp32 graph (the backend's precision hint makes the rest 16-bit)
    VARIANT_OPTIONAL: frozenset
    # precision → the libraries besides LIBRARY that decide what its engines compute at build time (their
    # versions go into the engine key; running the engine does not need them), e.g. NNCF for OpenVINO's int8w
    PRECISION_LIBRARIES: Mapping
    # precision → a revision tag in its engines' keys, bumped when how the backend builds that precision
    # changes in a way nothing else in the key shows (OpenVINO's int8 float layers moving to bf16)
    KEY_REVISIONS: Mapping

    def build_target(self, requested: str | None = None) -> dict:
        """The device engines are built for: this machine's (CPU ISA, or GPU name and compute capability; raises
        MissingDependencyError when it has none), or, for a backend that builds ahead of time for devices it
        does not need, `requested` (TensorRT-RTX: compute capabilities, "8.6,8.9"). A backend that builds for
        this machine only refuses a request (refuse_target_request)."""

    def library_versions(self) -> dict:
        """{library: version} of what builds and runs the engines; raises MissingDependencyError if absent."""

    def auto_preference(self) -> int:
        """How much `--backend auto`'s rule of thumb wants this backend on this machine: 0 not at all (not
        installed, no device); among the others the highest wins."""

    def capabilities(self, target: Mapping) -> str:
        """What this backend builds on `target`, in a line (`sprintrt doctor`)."""

    def default_precisions(self, versions: Mapping | None = None, target: Mapping | None = None) -> dict:
        """{component: Precision} used for components the user does not name."""

    def quantized_base(self, component: str, target: Mapping, precision):
        """The typed variant's dtype (a Precision) whose graph int8/fp8 Q/DQ pairs (or int8w's compressed
        weights) are put into, so that the layers not quantized run in it; None: the fp32 graph."""

    def check_buildable(self, component: str, precision, export_record: Mapping, versions: Mapping,
                        target: Mapping) -> None:
        """Raise a typed error, before any work, if this component cannot be built here in `precision`."""

    def profile(self, spec, model, options) -> dict:
        """{dim name: {min, opt, max}}: the shapes the engine will accept."""

    def build_component(self, source: Path, out: Path, component: str, precision, shapes: dict, target: Mapping,
                        versions: Mapping, compiled_cache: bool = True) -> BuildResult:
        """Build `out` from `source` (written under a temporary name, then renamed). `compiled_cache`: where the
        backend keeps a compiled-model cache beside its engines (OpenVINO's blobs; the others have none), fill it
        now, so the first load is fast; False leaves it to the first load that asks for it."""


def refuse_target_request(backend: str, requested: str | None) -> None:
    """The build_target of a backend that builds for this machine only: a named target is a typed error."""
    if requested is not None:
        raise InvalidInputError(f"target={requested!r}: backend {backend!r} builds for this machine only. Fix: drop "
                                "--compute-capability, or build with --backend tensorrt-rtx (ahead of time)")


def canonical(name: str) -> str:
    """'ort' → 'onnxruntime' (and the other aliases); an unknown name is a typed error."""
    backend = ALIASES.get(name, name)
    if backend not in BUILD_BACKENDS:
        raise InvalidInputError(f"backend={name!r} is not known: expected one of {[*BUILD_BACKENDS, AUTO]} (or "
                                f"{', '.join(ALIASES)}). Fix: pass --backend auto, or one of those")
    return backend


def backend_module(name: str) -> BuildBackend:
    module = importlib.import_module(BUILD_BACKENDS[canonical(name)][0])
    return module  # type: ignore[return-value]  # a module satisfying BuildBackend


def available(name: str) -> bool:
    """Whether this machine can build `name`'s engines (its library, and its device where it needs one)."""
    mod = backend_module(name)
    try:
        mod.build_target()
        mod.library_versions()
    except MissingDependencyError:
        return False
    return True


def cpu_backends() -> list[str]:
    """The backends whose engines run on this CPU and can be built here (the tuner's candidates)."""
    return [name for name in BUILD_BACKENDS if backend_module(name).DEVICE == "cpu" and available(name)]


def auto_backend() -> str:
    """`--backend auto`'s rule of thumb: the backend that wants this machine most (TensorRT with an NVIDIA GPU;
    OpenVINO on CPUs with bf16 instructions; else ONNX Runtime); the first listed wins a tie."""
    wants = {name: backend_module(name).auto_preference() for name in BUILD_BACKENDS}
    name = max(wants, key=wants.get)  # max keeps the first of equals
    if wants[name] <= 0:
        raise MissingDependencyError("no engine backend is installed here. Fix: pip install onnxruntime (CPU), or "
                                     "see `sprintrt doctor`")
    return name


def tunes_here(backend: str) -> bool:
    """Whether `--backend auto` times candidates here: when its choice runs on this CPU."""
    return backend_module(backend).DEVICE == "cpu"
