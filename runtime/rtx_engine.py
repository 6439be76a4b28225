"""TensorRT for RTX engines (NVIDIA RTX GPUs): TensorRT's engine code with TensorRT-RTX's module, a runtime
cache and its own machine check.

A TensorRT-RTX engine is built ahead of time for compute capabilities, not for one GPU (engines/rtx_build.py),
and specialises for the GPU it runs on when its execution context is made ("JIT", and again for each new
shape). Those results are kept in a runtime cache file beside the engine (`<engine>.runtime-cache`, written
after the first call at each shape and on release, under a temporary name and renamed), so the next process
starts without compiling again. A cache from another TensorRT-RTX version, GPU or driver is ignored (the
library says it does not match) and rewritten.
"""

from __future__ import annotations

import os
from typing import Mapping

from sprintrt import machine
from sprintrt.errors import MissingDependencyError
from sprintrt.runtime.engine import Engine
from sprintrt.runtime.trt_engine import TrtEngine

# What an engine built without named targets runs on: TensorRT-RTX's portable default, Ampere and later.
DEFAULT_MIN_COMPUTE_CAPABILITY = (8, 0)


class RtxEngine(TrtEngine):
    MODULE = "tensorrt_rtx"
    FIX = ("Fix: run on an RTX GPU of one of the engines' compute capabilities with tensorrt-rtx installed, or "
           "rebuild with `sprintrt build ONNX_DIR -o ENGINE_DIR --backend tensorrt-rtx --compute-capability CC`")

    @classmethod
    def machine_problem(cls, entry: Mapping) -> str | None:
        """Built for compute capabilities, not for this GPU: this GPU's must be one of them (or, for TensorRT-RTX's
        portable default, Ampere or later), with the TensorRT-RTX version that built the engines."""
        try:
            gpu = machine.gpu_target()
        except MissingDependencyError as e:
            raise MissingDependencyError(f"{e}, and TensorRT-RTX engines run on an NVIDIA RTX GPU. {cls.FIX}") from None
        targets = str(entry["target"]["compute_capability"]).split(",")
        cc = gpu["compute_capability"]
        if entry["target"].get("portable_default"):
            fits = machine.compute_capability(cc) >= DEFAULT_MIN_COMPUTE_CAPABILITY
        else:
            fits = cc in targets
        if not fits:
            return f"was built for compute capabilities {', '.join(targets)}; this GPU ({gpu['name']}) has {cc}"
        return Engine.library_problem(entry)

    def _execution_context(self):
        runtime_config = self.engine.create_runtime_config()
        self._runtime_cache = runtime_config.create_runtime_cache()
        self._runtime_cache_path = self.path.with_name(self.path.name + ".runtime-cache")
        if self._runtime_cache_path.is_file():
            self._runtime_cache.deserialize(self._runtime_cache_path.read_bytes())  # False (ignored) if stale
        runtime_config.set_runtime_cache(self._runtime_cache)
        self._shapes_cached: set = set()
        return self.engine.create_execution_context(runtime_config)

    def _infer(self, feeds):
        outs = super()._infer(feeds)
        shapes = tuple(feeds[t.name].shape for t in self.spec.inputs)
        if shapes not in self._shapes_cached:  # the first call at a shape may have compiled kernels for it
            self._shapes_cached.add(shapes)
            self._save_runtime_cache()
        return outs

    def _save_runtime_cache(self) -> None:
        data = self._runtime_cache.serialize()
        tmp = self._runtime_cache_path.with_name(f".{self._runtime_cache_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(memoryview(data))
            os.replace(tmp, self._runtime_cache_path)
        except OSError:  # a read-only engine directory: the cache is an optimisation, the engine still runs
            tmp.unlink(missing_ok=True)

    def _release(self) -> None:
        if getattr(self, "_runtime_cache", None) is not None:
            self._save_runtime_cache()
        super()._release()
