"""OpenVINO engines (CPU): the IR compiled with the configuration the build recorded, from its blob cache."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sprintrt.errors import EngineDirError, MissingDependencyError
from sprintrt.runtime.engine import Engine


class OvEngine(Engine):
    """An OpenVINO compiled model (CPU plugin), with the precision hint the engine was built for."""

    def _open(self, entry: dict, options, context) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise MissingDependencyError(f"the openvino backend needs the 'openvino' package ({e}). Fix: pip install "
                                         "openvino, or rebuild with --backend onnxruntime") from e
        # The configuration the build compiled with, so the compiled blob in the cache is found, not recompiled.
        config = dict(entry["compile_config"])
        if options.compiled_cache:
            config["CACHE_DIR"] = str(self.path.parent / entry["cache_dir"])
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = options.threads
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except RuntimeError as e:
            raise EngineDirError(f"OpenVINO cannot load {self.path}: {e}. {self.rebuild}") from e
        self.request = self.compiled.create_infer_request()

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(dict(feeds))
        # Copies: the request's output tensors are overwritten by its next inference.
        return [self.request.get_tensor(n).data.copy() for n in self.output_names]

    def _release(self) -> None:
        self.request = self.compiled = None
