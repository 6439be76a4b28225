"""The int8 quantizer's shortcuts (engines/ort_weights.py, quantize.external_weights_copy, the calibrator's
quantizer_tensors) give ONNX Runtime's own bits."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

from sprintrt.engines import ort_weights
from sprintrt.engines import quantize as Q
from sprintrt.engines.quantize import quantize_qdq
from sprintrt.export_info import read_export_info
from sprintrt.specs import SPEC_BUILDERS, ModelDims

XEON = {"kind": "cpu", "arch": "x86_64", "name": "Xeon", "isa": ["avx2", "avx512_bf16", "avx512_vnni", "avx512f"]}
EPYC = {"kind": "cpu", "arch": "x86_64", "name": "AMD EPYC", "isa": ["avx2", "fma"]}  # 7-bit weights, uint8 activations
H100 = {"kind": "gpu", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}  # float biases


def _stock(data, axis, quant_type, symmetric, reduce_range, min_real_range):
    """ONNX Runtime's loop, as qdq_quantizer runs it: params per channel, then each channel quantized."""
    params = [compute_data_quant_params(data.take(i, axis).ravel(), quant_type, symmetric, reduce_range=reduce_range,
                                        min_real_range=min_real_range) for i in range(data.shape[axis])]
    zero_point, scale = np.asarray([p[0] for p in params]), np.asarray([p[1] for p in params])
    dims = list(data.shape)
    dims[axis] = 1
    values = [quantize_nparray(quant_type, data.take(i, axis).ravel(), scale[i], zero_point[i])
              for i in range(data.shape[axis])]
    values = np.concatenate([np.asarray(v).reshape(dims) for v in values], axis)
    return zero_point, scale, values


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(5, 7), (3, 4, 3, 3), (1, 9), (6, 1, 1, 1)]),
       axis=st.integers(0, 1), quant_type=st.sampled_from([TensorProto.INT8, TensorProto.UINT8]),
       symmetric=st.booleans(), reduce_range=st.booleans(), min_real_range=st.sampled_from([None, 1e-4, 0.5]),
       special=st.sampled_from(["none", "zero channel", "negative", "positive", "tiny", "ties"]))
def test_each_channel_gets_onnx_runtimes_scale_zero_point_and_values(seed, shape, axis, quant_type, symmetric,
                                                                      reduce_range, min_real_range, special):
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 40.0])).astype(np.float32)
    first = (slice(None),) * axis + (0,)
    if special == "zero channel":
        data[first] = 0  # a scale below float32's tiny: ORT's scale 1, zero point 0
    elif special == "negative":
        data = -np.abs(data)
    elif special == "positive":
        data = np.abs(data)
    elif special == "tiny":
        data[first] = 1e-39
    elif special == "ties":  # values exactly half-way between two steps: round half to even in both
        data = (rng.integers(-60, 60, shape) + 0.5).astype(np.float32)
    zero_point, scale, values = _stock(data, axis, quant_type, symmetric, reduce_range, min_real_range)
    mine_zp, mine_scale = ort_weights.per_channel_params(data, axis, quant_type, symmetric, reduce_range,
                                                         min_real_range)
    assert mine_zp.dtype == zero_point.dtype and np.array_equal(mine_zp, zero_point)
    assert mine_scale.dtype == scale.dtype and np.array_equal(mine_scale, scale)
    mine_values = ort_weights.quantize_per_channel(data, axis, quant_type, mine_zp, mine_scale)
    assert mine_values.dtype == values.dtype and np.array_equal(mine_values, values)


def _canonical(model):
    """Without an explicit `data_location: DEFAULT` (onnx marks weights loaded back from a file so; the same
    tensor)."""
    for init in model.graph.initializer:
        if init.HasField("data_location") and init.data_location == TensorProto.DEFAULT:
            init.ClearField("data_location")
    return model


@pytest.mark.parametrize("component,target,precision", [
    ("text_encoder", XEON, "int8"), ("text_encoder", EPYC, "int8"), ("transformer", EPYC, "int8"),
    ("transformer", H100, "int8"), ("vae_decoder", XEON, "int8"), ("vae_decoder", H100, "int8"),
    ("vae_encoder", EPYC, "int8"), ("transformer", H100, "fp8"),
])
def test_the_q_dq_graph_is_onnx_runtimes_own_bit_for_bit(onnx_dir, tmp_path, monkeypatch, component, target,
                                                         precision):
    """Whole graphs (every node, every quantized weight, scale, zero point and int32/float bias) written through
    quantize_qdq (vectorised weights, an external-weights copy of a graph holding its weights, ranges recorded
    for the quantizer's tensors only), and by ONNX Runtime's own quantize_static on the source file itself, its
    calibrator recording every tensor of every op type it can quantize and its per-channel loop writing the
    weights: identical. The CPU targets differ in weight bits (7 on EPYC) and activation type; the GPU target
    keeps biases float (no weight-scale adjustment for them); fp8 takes the histogram calibrator."""
    from onnxruntime.quantization import QuantFormat, calibrate, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from sprintrt.engines.calibrator import _Feeds

    assert ort_weights.available(), "this onnxruntime lacks the internals engines/ort_weights.py replaces"
    dims = ModelDims.from_json(read_export_info(onnx_dir)["model_dims"])
    spec = SPEC_BUILDERS[component](dims)
    feeds = [spec.sample_inputs(spec.sizes("sample"), seed=i) for i in range(2)]
    source = onnx_dir / f"{component}.onnx"
    calls, copies, recorded = [], [], []
    original = ort_weights.per_channel_params
    monkeypatch.setattr(ort_weights, "per_channel_params", lambda *a: calls.append(a[0].shape) or original(*a))
    original_copy = Q.external_weights_copy
    monkeypatch.setattr(Q, "external_weights_copy", lambda *a: copies.append(a) or original_copy(*a))
    original_save = calibrate.save_tensors_data
    monkeypatch.setattr(calibrate, "save_tensors_data", lambda data, *a: recorded.append(len(data.data)) or
                        original_save(data, *a))
    ours = quantize_qdq(source, tmp_path / "ours.onnx", feeds, precision, target=target, component=component,
                        uniform=True)
    assert ours["quantized_nodes"] > 0
    if precision == "int8":
        assert len(calls) >= ours["quantized_nodes"]  # every quantized layer's weight went the vectorised way
    assert len(copies) == 1  # the tiny graphs hold their weights: ORT was given the copy
    monkeypatch.undo()
    quantize, _ = Q.quantizable_nodes(source, component)
    quantize_static(str(source), str(tmp_path / "stock.onnx"), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                    nodes_to_quantize=quantize, **Q._settings(precision, len(feeds), target, component))
    every = calibrate.MinMaxCalibrater(source, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                       str(tmp_path / "augmented.onnx"))  # the op types quantize_static calibrates
    assert recorded and recorded[0] < len(every.select_tensors_to_calibrate(every.model)[0]) / 2
    a, b = (_canonical(onnx.load(str(tmp_path / f"{name}.onnx"))) for name in ("ours", "stock"))
    assert len(a.graph.initializer) == len(b.graph.initializer)
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        assert x.SerializeToString() == y.SerializeToString(), x.name
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert a.SerializeToString() == b.SerializeToString()


def test_outside_the_context_the_stock_quantizer_runs():
    from onnxruntime.quantization import onnx_model, qdq_quantizer

    def stock():
        return (qdq_quantizer.QDQQuantizer._calc_initializer_quant_params, qdq_quantizer.quantize_onnx_initializer,
                onnx_model.ONNXModel._check_init)

    before = stock()
    with ort_weights.vectorised_weights() as active:
        assert active
        assert all(a is not b for a, b in zip(stock(), before))
    assert stock() == before


@settings(max_examples=80, deadline=None)
@given(data=st.lists(st.sampled_from([0x00, 0x01, 0x7e, 0x7f, 0x80, 0xfe, 0xff]), max_size=8).map(bytes),
       data_type=st.sampled_from([TensorProto.FLOAT8E4M3FN, TensorProto.UINT8]), raw=st.booleans())
def test_the_fp8_nan_check_is_onnx_runtimes_own(data, data_type, raw):
    """ONNX Runtime's check of a float8 initializer for NaN bytes (0x7f, 0xff), run byte by byte in Python on every
    initializer each time the quantizer adds one, and the vectorised one: the same verdict and the same error."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    init = TensorProto(name="w", data_type=data_type, dims=[len(data)])
    if raw:
        init.raw_data = data
    else:  # no raw_data: neither looks at it
        init.int32_data.extend(data)
    model = ONNXModel(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])))
    verdicts = []
    for patched in (False, True):
        with ort_weights.vectorised_weights() if patched else contextlib.nullcontext():
            try:
                verdicts.append(model._check_init(init) is init)
            except ValueError as e:
                verdicts.append(str(e))
    assert verdicts[0] == verdicts[1]
    assert (verdicts[0] is True) == (not raw or data_type != TensorProto.FLOAT8E4M3FN
                                     or not any(b & 127 == 127 for b in data))
