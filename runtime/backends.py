"""Engine backends for CPUs (ONNX Runtime, OpenVINO) and the loader that picks one per component.

`load_engine(manifest, component)` builds the engine class the manifest names; every class is an
`Engine` (runtime/engine.py), which checks inputs against the component spec and the engine's profile
before running and raises a typed error naming the tensor, the axis and the allowed range.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from sprintrt.engines.manifest import Manifest
from sprintrt.errors import EngineDirError, MissingDependencyError
from sprintrt.runtime.engine import Engine

REBUILD = "Fix: rebuild with `sprintrt build ONNX_DIR -o ENGINE_DIR --backend {backend} --rebuild` on this machine"


class OrtEngine(Engine):
    """An ONNX Runtime session over an ORT-optimised graph."""

    def __init__(self, manifest: Manifest, component: str, threads: int | None = None):
        super().__init__(manifest, component)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("the onnxruntime backend needs the 'onnxruntime' package. Fix: pip install "
                                         "onnxruntime (or onnxruntime-gpu on CUDA machines; never both)") from e
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
            raise EngineDirError(f"ONNX Runtime cannot load {path}: {e}. "
                                 f"{REBUILD.format(backend='onnxruntime')}") from e

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, dict(feeds))

    def _release(self) -> None:
        self.session = None


class OvEngine(Engine):
    """An OpenVINO compiled model (CPU plugin), with the precision hint the engine was built for."""

    def __init__(self, manifest: Manifest, component: str, threads: int | None = None):
        super().__init__(manifest, component)
        from sprintrt.engines import ov_build
        from sprintrt.engines.precision import Precision

        ov = ov_build.openvino()
        entry = manifest.components[component]
        config = ov_build.compile_config(Precision.parse(entry["precision"]), manifest.root / ov_build.CACHE, threads,
                                         target=entry["target"])
        try:
            self.compiled = ov.Core().compile_model(str(manifest.component_file(component)), "CPU", config)
        except RuntimeError as e:
            raise EngineDirError(f"OpenVINO cannot load {manifest.component_file(component)}: {e}. "
                                 f"{REBUILD.format(backend='openvino')}") from e
        self.request = self.compiled.create_infer_request()

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(dict(feeds))
        # Copies: the request's output tensors are overwritten by its next inference.
        return [self.request.get_tensor(n).data.copy() for n in self.output_names]

    def _release(self) -> None:
        self.request = self.compiled = None


def load_engine(manifest: Manifest, component: str, threads: int | None = None, stream=None,
                cuda_graph: bool = False) -> Engine:
    backend = manifest.components[component]["backend"]
    if backend == "onnxruntime":
        return OrtEngine(manifest, component, threads)
    if backend == "openvino":
        return OvEngine(manifest, component, threads)
    if backend == "tensorrt":
        from sprintrt.runtime.trt_backend import TrtEngine

        return TrtEngine(manifest, component, stream=stream, cuda_graph=cuda_graph)
    raise EngineDirError(f"'{component}' in {manifest.path} uses backend {backend!r}, which this sprintrt cannot "
                         "load. Fix: upgrade sprintrt, or rebuild with --backend onnxruntime, openvino or tensorrt")


def default_threads() -> int | None:
    """SPRINTRT_THREADS overrides the backend's own choice (one thread per physical core)."""
    value = os.environ.get("SPRINTRT_THREADS")
    return int(value) if value else None
