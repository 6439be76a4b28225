"""ONNX Runtime's per-channel weight quantization, on whole tensors instead of one channel at a time.

`quantize_static` computes a per-channel weight's scales, then quantizes it, in a Python loop over its output
channels (a `take`, a min, a max and a few NumPy calls per channel, twice). At real size that loop took ~170 s
of a `--backend auto` tuner run (py-spy, 23.5 min under the profiler, 2-vCPU Intel Xeon with AMX): Gemma2's 182
projections have 2304-9216 output channels each and every int8 probe and Q/DQ graph goes through it. Measured
on the same machine, writing the real text encoder's uniform int8 graph: 123 s with the loop, 59 s without
(the rest is loading and saving its 10 GB), the same graph bit for bit.

Inside `vectorised_weights()` the same arithmetic runs on whole arrays, step for step in the same dtypes
(float32 minima, float64 range over float64 quantized span, float32 scale; float32 division, round, add,
clip), so the scales, zero points and int8 values are the stock quantizer's, bit for bit
(tests/engines/test_ort_weights.py compares whole Q/DQ graphs written both ways). Only what that loop
handles takes this path: int8/uint8 weights quantized per channel, without tensor overrides or blocks;
everything else (fp8, per-tensor, overrides) stays ONNX Runtime's own code.

Two of ONNX Runtime's internals are replaced for the duration (QDQQuantizer._calc_initializer_quant_params,
wrapped, and the quantize_onnx_initializer its module calls). Where an installed version lacks either, the
context does nothing (the stock quantizer runs, only slower); the test fails on such a version, so CI says
when this needs a look.

A third, for fp8: each time ONNX Runtime adds initializers (once per bias it quantizes) it checks every float8
initializer of the graph for NaN bytes (ONNXModel._check_init), in Python, one byte at a time, so the check
grows with the square of the graph: at real size the DC-AE decoder's fp8 graph had not been written after 20 min
(py-spy: in that check). Within the context the same rule (a byte whose low 7 bits are all set is E4M3FN's NaN)
runs on the whole byte string with NumPy, and raises the same error.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

_INTEGER_TYPES = (2, 3)  # onnx.TensorProto.UINT8, INT8: the types the loop's arithmetic below matches
_lock = threading.RLock()


def per_channel_params(data: np.ndarray, axis: int, quant_type: int, symmetric: bool, reduce_range: bool,
                       min_real_range: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(zero points, scales) of each channel along `axis`: ONNX Runtime's compute_data_quant_params and
    compute_scale_zp applied to every channel at once."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range, symmetric=symmetric)
    channels = data.shape[axis]
    if data.size == 0:  # empty channels: ORT gives scale 1, zero point 0
        return np.zeros(channels, qmin.dtype), np.ones(channels, data.dtype)
    others = tuple(i for i in range(data.ndim) if i != axis)
    zero = np.array(0, dtype=data.dtype)
    rmin = np.minimum(data.min(axis=others), zero)
    rmax = np.maximum(data.max(axis=others), zero)
    if min_real_range is not None:
        rmax = np.maximum(rmax, rmin + np.asarray(min_real_range, dtype=rmin.dtype))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, +absmax
    span = np.array(qmax, dtype=np.float64) - np.array(qmin, dtype=np.float64)
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / span
    tiny = scale < np.finfo(rmax.dtype).tiny
    if symmetric:
        zero_point = np.full(scale.shape, np.round((qmin + qmax) / np.array(2.0, dtype=np.float64)), dtype=qmin.dtype)
    else:
        zero_point = np.round(qmin - rmin / np.where(tiny, 1.0, scale)).astype(qmin.dtype)
    zero_point[tiny] = 0
    scale = np.where(tiny, 1.0, scale).astype(rmax.dtype)
    return zero_point, scale


def quantize_per_channel(data: np.ndarray, axis: int, quant_type: int, zero_point: np.ndarray,
                         scale: np.ndarray) -> np.ndarray:
    """ONNX Runtime's quantize_nparray for each channel along `axis`, at once."""
    from onnx.helper import tensor_dtype_to_np_dtype
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
    shape = [1] * data.ndim
    shape[axis] = -1
    values = data.astype(np.float32) / scale.reshape(shape)
    np.round(values, out=values)
    values += zero_point.reshape(shape)
    np.clip(values, qmin, qmax, out=values)
    return values.astype(tensor_dtype_to_np_dtype(quant_type))


def _handled(quantizer, name: str, info) -> bool:
    from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType

    return (info.tensor_type is QDQQuantTensorType.WEIGHT and info.axis is not None
            and not quantizer.tensor_quant_overrides.get(name) and not getattr(quantizer, "block_size", 0)
            and quantizer.weight_qType in _INTEGER_TYPES)


def _calc_params(stock):
    def calc(quantizer):
        from onnxruntime.quantization.base_quantizer import QuantizationParams
        from onnxruntime.quantization.quant_utils import find_by_name, normalize_axis, tensor_proto_to_array

        everything = quantizer.tensors_to_quantize
        mine = {}
        for name, info in everything.items():
            initializer = find_by_name(name, quantizer.model.initializer()) if _handled(quantizer, name, info) else None
            if initializer is not None:
                mine[name] = (initializer, info)
        quantizer.tensors_to_quantize = {k: v for k, v in everything.items() if k not in mine}
        try:
            theirs = stock(quantizer)
        finally:
            quantizer.tensors_to_quantize = everything
        for name, (initializer, info) in mine.items():
            data = tensor_proto_to_array(initializer)
            valid, axis = normalize_axis(info.axis, data.ndim)
            if not valid:
                raise ValueError(f"Weight {name} has a per-channel axis with value {info.axis} that is "
                                 f"out-of-bounds for rank {data.ndim}")
            # per-channel weights are always symmetric in ORT (QLinear ops need one zero point)
            zero_point, scale = per_channel_params(data, axis, quantizer.weight_qType, True, quantizer.reduce_range,
                                                   quantizer.min_real_range)
            theirs[name] = QuantizationParams(zero_point=zero_point, scale=scale, quant_type=quantizer.weight_qType,
                                              axis=axis)
        return {name: theirs[name] for name in everything if name in theirs}  # in the stock order
    return calc


def _quantize_initializer(stock):
    def quantize(weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None, block_size=0):
        if axis is None or block_size or quant_type not in _INTEGER_TYPES:
            return stock(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size=block_size)
        from onnx import numpy_helper
        from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, tensor_proto_to_array

        values = quantize_per_channel(tensor_proto_to_array(weight), axis, quant_type, np.asarray(zero_point),
                                      np.asarray(scale))
        name = quant_weight_name or f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
        return numpy_helper.from_array(values.reshape(tuple(weight.dims)), name)
    return quantize


def _check_init(stock):
    def check(model, init, test=None):
        from onnx import TensorProto

        if init.data_type == TensorProto.FLOAT8E4M3FN and init.HasField("raw_data"):
            if ((np.frombuffer(init.raw_data, np.uint8) & 127) == 127).any():
                raise ValueError(f"Initializer {init.name!r} has nan.")
            return init
        return stock(model, init, test)
    return check


def available() -> bool:
    """Whether this ONNX Runtime has the three internals replaced here."""
    from onnxruntime.quantization import onnx_model, qdq_quantizer

    return (hasattr(qdq_quantizer, "quantize_onnx_initializer")
            and hasattr(qdq_quantizer.QDQQuantizer, "_calc_initializer_quant_params")
            and hasattr(onnx_model.ONNXModel, "_check_init"))


@contextmanager
def vectorised_weights() -> Iterator[bool]:
    """Within it, ONNX Runtime's QDQ quantizer quantizes per-channel integer weights a tensor at a time and
    checks float8 initializers for NaN on whole byte strings.
    Yields whether it does (False: this ONNX Runtime lacks the internals; the stock loop runs)."""
    from onnxruntime.quantization import onnx_model, qdq_quantizer

    if not available():
        yield False
        return
    with _lock:  # the patch is process-wide: one quantization at a time holds it
        cls, model = qdq_quantizer.QDQQuantizer, onnx_model.ONNXModel
        stock_calc, stock_quantize = cls._calc_initializer_quant_params, qdq_quantizer.quantize_onnx_initializer
        stock_check = model._check_init
        cls._calc_initializer_quant_params = _calc_params(stock_calc)
        qdq_quantizer.quantize_onnx_initializer = _quantize_initializer(stock_quantize)
        model._check_init = _check_init(stock_check)
        try:
            yield True
        finally:
            cls._calc_initializer_quant_params = stock_calc
            qdq_quantizer.quantize_onnx_initializer = stock_quantize
            model._check_init = stock_check
