"""Engine backends: one loaded engine per component, with a load → infer → release lifecycle.

`load_engine(manifest, component)` picks the backend the manifest names. Every backend checks its
inputs against the component spec and the engine's profile before running, and raises a typed error
naming the tensor, the axis and the allowed range (never an error from deep inside the library).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from sprintrt.engines.manifest import Manifest
from sprintrt.errors import EngineDirError, MissingDependencyError
from sprintrt.export import specs as S


def profile_limits(manifest: Manifest, component: str) -> dict[str, S.Bounds]:
    """The engine's dim ranges as built (its shape profile), from the manifest."""
    dims = manifest.components[component]["io"]["dims"]
    return {name: S.Bounds(d["min"], d["opt"], d["max"]) for name, d in dims.items()}


def component_spec(manifest: Manifest, component: str) -> S.ComponentSpec:
    return S.SPEC_BUILDERS[component](S.model_dims_from_json(manifest.data["model_dims"]))


class OrtEngine:
    """An ONNX Runtime session over an ORT-optimised graph."""

    def __init__(self, manifest: Manifest, component: str, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("the onnxruntime backend needs the 'onnxruntime' package. Fix: pip install "
                                         "onnxruntime (or onnxruntime-gpu on CUDA machines; never both)") from e
        self.name = component
        self.spec = component_spec(manifest, component)
        self.limits = profile_limits(manifest, component)
        entry = manifest.components[component]
        opts = ort.SessionOptions()
        # The file is already optimised for this CPU at build time; optimising again only costs start-up.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        path = manifest.component_file(component)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=[entry["execution_provider"]])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types for unreadable files
            raise EngineDirError(f"ONNX Runtime cannot load {path}: {e}. Fix: rebuild with `sprintrt build "
                                 "ONNX_DIR -o ENGINE_DIR --rebuild`") from e
        self.output_names = [t.name for t in self.spec.outputs]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds, self.limits)
        outs = self.session.run(self.output_names, {t.name: feeds[t.name] for t in self.spec.inputs})
        return dict(zip(self.output_names, outs))

    def release(self) -> None:
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class OvEngine:
    """An OpenVINO compiled model (CPU plugin), with the precision hint the engine was built for."""

    def __init__(self, manifest: Manifest, component: str, threads: int | None = None):
        from sprintrt.engines import ov_build
        from sprintrt.engines.precision import Precision

        ov = ov_build._ov()
        self.name = component
        self.spec = component_spec(manifest, component)
        self.limits = profile_limits(manifest, component)
        entry = manifest.components[component]
        config = ov_build.compile_config(Precision.parse(entry["precision"]), manifest.root / ov_build.CACHE, threads)
        try:
            self.compiled = ov.Core().compile_model(str(manifest.component_file(component)), "CPU", config)
        except RuntimeError as e:
            raise EngineDirError(f"OpenVINO cannot load {manifest.component_file(component)}: {e}. Fix: rebuild with "
                                 "`sprintrt build ONNX_DIR -o ENGINE_DIR --backend openvino --rebuild`") from e
        self.request = self.compiled.create_infer_request()
        self.output_names = [t.name for t in self.spec.outputs]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds, self.limits)
        self.request.infer({t.name: feeds[t.name] for t in self.spec.inputs})
        # Copies: the request's output tensors are overwritten by its next inference.
        return {n: self.request.get_tensor(n).data.copy() for n in self.output_names}

    def release(self) -> None:
        self.request = self.compiled = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def load_engine(manifest: Manifest, component: str, threads: int | None = None, stream=None,
                cuda_graph: bool = False):
    backend = manifest.components[component]["backend"]
    if backend == "onnxruntime":
        return OrtEngine(manifest, component, threads)
    if backend == "openvino":
        return OvEngine(manifest, component, threads)
    if backend == "tensorrt":
        from sprintrt.runtime.trt_backend import TrtEngine

        return TrtEngine(manifest, component, stream=stream, cuda_graph=cuda_graph)
    raise EngineDirError(f"'{component}' in {manifest.path} uses backend {backend!r}, which this sprintrt cannot "
                         "load. Fix: upgrade sprintrt, or rebuild with --backend onnxruntime")


def default_threads() -> int | None:
    """SPRINTRT_THREADS overrides ORT's own choice (one thread per physical core)."""
    value = os.environ.get("SPRINTRT_THREADS")
    return int(value) if value else None


def machine_for(backend: str) -> tuple[dict, Mapping[str, str]]:
    """(target, library versions) of this machine for a backend, to check engines against."""
    if backend == "tensorrt":
        from sprintrt.engines import trt_build

        return trt_build.target(), trt_build.versions()
    if backend == "openvino":
        from sprintrt.engines import ov_build

        return ov_build.target(), ov_build.versions()
    from sprintrt.engines import ort_build

    try:
        return ort_build.target(), ort_build.versions()
    except ImportError as e:
        raise MissingDependencyError("the onnxruntime backend needs the 'onnxruntime' package. Fix: pip install "
                                     "onnxruntime") from e
