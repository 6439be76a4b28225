"""TensorRT engines (NVIDIA GPUs): deserialize once, one execution context, device buffers reused per shape.

Lifecycle (Polygraphy BaseRunner's): load → infer → release. All engines of a pipeline share one
CUDA stream (`open_context`; `polygraphy.cuda`, a thin ctypes wrapper of libcudart: no extra dependency).

Host ↔ device traffic per image, and why it is there:
- inputs are uploaded when they change; an input with the same shape and contents (crc32) as in the
  previous call stays on the device (the pipeline hands the transformer the same prompt embeddings,
  mask and guidance every step, so they cross the bus once per prompt);
- the text encoder's output comes back to the host once for the select_index slicing (B x L x 2304
  float32, ~3.8 MB at L = 412);
- per step, the latents go up and the flow prediction comes down (B x 32 x h x w float32: 128 KB at
  1024²), because the TrigFlow scheduler is NumPy; at one or two steps this is microseconds;
- the image comes down once, into pinned (page-locked) host memory.

CUDA graphs: with `cuda_graph=True` and a static-shape engine, the first call at a shape runs
normally, the second is captured into a CUDA graph and every later call at the same shape replays
it (no per-layer launch overhead). Shapes may not change under a graph: a new shape re-captures.
"""

from __future__ import annotations

import ctypes
import importlib
import zlib

import numpy as np

from sprintrt.errors import EngineDirError, MissingDependencyError
from sprintrt.runtime.engine import Engine

_FIX = ("Fix: install TensorRT and run on the GPU the engines were built for, or rebuild with --backend onnxruntime "
        "or openvino for a CPU")




class _PinnedBuffer:
    """Page-locked host memory (cudaMallocHost), so device→host copies run at full bus speed."""

    def __init__(self, cuda, nbytes: int):
        self._cuda = cuda
        self.ptr = ctypes.c_void_p()
        cuda.wrapper().check(cuda.wrapper().handle.cudaMallocHost(ctypes.byref(self.ptr), ctypes.c_size_t(nbytes)))
        self.nbytes = nbytes

    def array(self, shape, dtype) -> np.ndarray:
        count = int(np.prod(shape))
        buf = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(self.ptr.value)
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._cuda.wrapper().handle.cudaFreeHost(self.ptr)
            self.ptr = ctypes.c_void_p()


class TrtEngine(Engine):
    MODULE = "tensorrt"  # the TensorRT module that deserialises and runs these engines
    FIX = _FIX

    @classmethod
    def _imports(cls):
        try:
            trt = importlib.import_module(cls.MODULE)
            from polygraphy import cuda
        except Exception as e:  # ImportError, or TensorRT's pip stub that raises on import
            raise MissingDependencyError(f"these engines need {cls.MODULE} and polygraphy ({e}). {cls.FIX}") from e
        return trt, cuda

    @classmethod
    def open_context(cls):
        """One CUDA stream for every engine of this backend in a pipeline."""
        _, cuda = cls._imports()
        return cuda.Stream()

    def _open(self, entry: dict, options, context) -> None:
        trt, cuda = self._imports()
        self._trt, self._cuda = trt, cuda
        logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineDirError(f"{self.MODULE} could not deserialize {self.path} (built by another version or for "
                                 f"another GPU?). {self.rebuild}")
        self.context = self._execution_context()
        self.stream = context or cuda.Stream()
        self._owns_stream = context is None
        self.cuda_graph = options.cuda_graph
        self._device: dict[str, object] = {}  # tensor name → cuda.DeviceArray, grown as needed
        self._last_host: dict[str, tuple] = {}  # input name → (shape, dtype, crc32) of what is on the device
        self._pinned: dict[str, _PinnedBuffer] = {}
        self._graph_exec, self._graph_shapes, self._calls_at_shape = None, None, 0

    def _execution_context(self):
        return self.engine.create_execution_context()

    # -- buffers ---------------------------------------------------------------------------------
    def _buffer(self, name: str, shape, dtype):
        arr = self._device.get(name)
        if arr is None:
            arr = self._cuda.DeviceArray(shape=tuple(shape), dtype=np.dtype(dtype))
            self._device[name] = arr
        else:
            arr.resize(tuple(shape))
        return arr

    def _upload(self, name: str, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        buf = self._buffer(name, host.shape, host.dtype)
        fingerprint = (host.shape, host.dtype.str, zlib.crc32(memoryview(host).cast("B")))
        if self._last_host.get(name) != fingerprint:
            buf.copy_from(host, stream=self.stream)
            self._last_host[name] = fingerprint
        self.context.set_input_shape(name, tuple(host.shape))
        self.context.set_tensor_address(name, buf.ptr)

    def _download(self, name: str, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pinned = self._pinned.get(name)
        if pinned is None or pinned.nbytes < nbytes:
            if pinned is not None:
                pinned.free()
            pinned = self._pinned[name] = _PinnedBuffer(self._cuda, nbytes)
        host = pinned.array(shape, dtype)
        self._device[name].view(shape=tuple(shape)).copy_to(host, stream=self.stream)
        return host

    # -- inference -------------------------------------------------------------------------------
    def _infer(self, feeds) -> list[np.ndarray]:
        for t in self.spec.inputs:
            self._upload(t.name, feeds[t.name])
        shapes = {}
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            shapes[t.name] = shape
            self.context.set_tensor_address(t.name, self._buffer(t.name, shape, t.dtype).ptr)
        self._execute(tuple(feeds[t.name].shape for t in self.spec.inputs))
        outs = {t.name: self._download(t.name, shapes[t.name], t.dtype) for t in self.spec.outputs}
        self.stream.synchronize()
        # Copies: the pinned buffers are reused by the next call.
        return [outs[n].copy() for n in self.output_names]

    def _execute(self, input_shapes) -> None:
        if not self.cuda_graph:
            if not self.context.execute_async_v3(self.stream.ptr):
                raise EngineDirError(f"{self.MODULE} failed to run '{self.name}'. {self.FIX}")
            return
        lib = self._cuda.wrapper()
        if input_shapes != self._graph_shapes:
            self._drop_graph()
            self._graph_shapes, self._calls_at_shape = input_shapes, 0
        if self._graph_exec is not None:
            lib.check(lib.handle.cudaGraphLaunch(self._graph_exec, ctypes.c_void_p(self.stream.ptr)))
            return
        self._calls_at_shape += 1
        if self._calls_at_shape == 1:  # TensorRT allocates lazily on the first run: never capture it
            self.context.execute_async_v3(self.stream.ptr)
            return
        graph, exec_ = ctypes.c_void_p(), ctypes.c_void_p()
        lib.check(lib.handle.cudaStreamBeginCapture(ctypes.c_void_p(self.stream.ptr), 0))  # cudaStreamCaptureModeGlobal
        self.context.execute_async_v3(self.stream.ptr)
        lib.check(lib.handle.cudaStreamEndCapture(ctypes.c_void_p(self.stream.ptr), ctypes.byref(graph)))
        lib.check(lib.handle.cudaGraphInstantiate(ctypes.byref(exec_), graph, ctypes.c_ulonglong(0)))
        lib.handle.cudaGraphDestroy(graph)
        self._graph_exec = exec_
        lib.check(lib.handle.cudaGraphLaunch(self._graph_exec, ctypes.c_void_p(self.stream.ptr)))

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            self._cuda.wrapper().handle.cudaGraphExecDestroy(self._graph_exec)
            self._graph_exec = None

    def _release(self) -> None:
        self._drop_graph()
        for arr in self._device.values():
            arr.free()
        for buf in self._pinned.values():
            buf.free()
        self._device, self._pinned, self._last_host = {}, {}, {}
        self.context = None
        self.engine = None
        if self._owns_stream:
            self.stream.free()
