"""ONNX Runtime engines (CPU): a session over the graph the build optimised for this CPU."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sprintrt.errors import EngineDirError, MissingDependencyError
from sprintrt.runtime.engine import Engine


class OrtEngine(Engine):
    """An ONNX Runtime session over an ORT-optimised graph."""

    def _open(self, entry: dict, options, context) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("the onnxruntime backend needs the 'onnxruntime' package. Fix: pip install "
                                         "onnxruntime (or onnxruntime-gpu on CUDA machines; never both)") from e
        opts = ort.SessionOptions()
        # The file is already optimised for this CPU at build time; optimising again only costs start-up.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if options.threads:
            opts.intra_op_num_threads = options.threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=[entry["execution_provider"]])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types for unreadable files
            raise EngineDirError(f"ONNX Runtime cannot load {self.path}: {e}. {self.rebuild}") from e

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, dict(feeds))

    def _release(self) -> None:
        self.session = None
