"""The build-side contract every engine backend module satisfies, and the registry of backends.

A backend module (engines/ort_build.py, ov_build.py, trt_build.py) turns one ONNX file into one
engine file for this machine. `engines/build.py` only orchestrates (read the export, resolve
precisions, reuse or build, verify every file, write the manifest) and names no backend in an `if`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Mapping, Protocol, runtime_checkable

from sprintrt.errors import InvalidInputError, MissingDependencyError

# Backend name → its module. The order is the order `--backend` documents them in.
BACKENDS = {"onnxruntime": "sprintrt.engines.ort_build", "openvino": "sprintrt.engines.ov_build",
            "tensorrt": "sprintrt.engines.trt_build"}
# Short names the CLI and the benchmark accept.
ALIASES = {"ort": "onnxruntime", "ov": "openvino", "trt": "tensorrt"}


@dataclass(frozen=True)
class BuildResult:
    """What building one component produced besides the engine file itself."""

    info: dict  # manifest fields the backend adds (execution provider, precision hints, ...)
    extra_files: tuple[Path, ...] = field(default=())  # files the engine needs beside it, verified like it


@runtime_checkable
class BuildBackend(Protocol):
    """One engine backend. Modules satisfy it structurally (module-level names)."""

    NAME: str  # the --backend name, recorded in the manifest
    LIBRARY: str  # the library whose version is in the engine key
    SUFFIX: str  # the engine file's suffix
    TYPED_PRECISIONS: frozenset  # precisions built from the export's typed variant, not the fp32 graph
    # precisions built from the typed variant when the export has one, else from the fp32 graph (the backend's
    # precision hint makes the rest 16-bit); a subset of TYPED_PRECISIONS
    VARIANT_OPTIONAL: frozenset
    # precision → the libraries besides LIBRARY that decide what its engines compute at build time (their
    # versions go into the engine key; running the engine does not need them), e.g. NNCF for OpenVINO's int8w
    PRECISION_LIBRARIES: Mapping

    def target(self) -> dict:
        """The device engines are built for here (CPU ISA, or GPU name and compute capability).
        Raises MissingDependencyError when this machine has none."""

    def versions(self) -> dict:
        """{library: version} of what builds and runs the engines; raises MissingDependencyError if absent."""

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
                        versions: Mapping) -> BuildResult:
        """Build `out` from `source` (written under a temporary name, then renamed)."""


def canonical(name: str) -> str:
    """'ort' → 'onnxruntime' (and the other aliases); an unknown name is a typed error."""
    backend = ALIASES.get(name, name)
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend={name!r} is not known: expected one of {list(BACKENDS) + ['auto']} (or "
                                f"{', '.join(ALIASES)}). Fix: pass --backend auto, onnxruntime or openvino (CPU), "
                                "or tensorrt (NVIDIA GPU)")
    return backend


def backend_module(name: str) -> BuildBackend:
    module: ModuleType = importlib.import_module(BACKENDS[canonical(name)])
    return module  # type: ignore[return-value]  # a module satisfying BuildBackend


def machine_for(backend: str) -> tuple[dict, dict]:
    """(target, library versions) of this machine for a backend, to check engines against."""
    mod = backend_module(backend)
    return mod.target(), mod.versions()


def auto_backend() -> str:
    """The backend that wins on this machine by rule of thumb: TensorRT with an NVIDIA GPU and TensorRT;
    else OpenVINO where it is installed and the CPU has bf16 instructions (bf16 kernels, which ONNX
    Runtime's CPU provider lacks); else ONNX Runtime."""
    from sprintrt import machine

    try:
        machine_for("tensorrt")
        return "tensorrt"
    except MissingDependencyError:
        pass
    if machine.library_version("openvino") and machine.cpu_has_bf16():
        return "openvino"
    return "onnxruntime"
