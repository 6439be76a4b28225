"""engines/ort_build.py u8_activations: an int8 Q/DQ graph's activation pairs made uint8 for ONNX Runtime's
kernels, the same numbers; pairs that cannot follow (a graph output, a reader without the same zero point) kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sprintrt.engines.ort_build import u8_activations


def _graph(path):
    """x -> Q (s8, shared by two MatMuls through one DequantizeLinear each) -> y1, y2; x -> Q2 -> graph output."""
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.integers(-127, 128, (8, 4), dtype=np.int8), f"w{i}") for i in range(2)]
    inits = [*w, numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.int8(0), "wz"),
             numpy_helper.from_array(np.int8(0), "z2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xa"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xb"]),
             *[helper.make_node("DequantizeLinear", [f"w{i}", "ws", "wz"], [f"wd{i}"]) for i in range(2)],
             helper.make_node("MatMul", ["xa", "wd0"], ["y1"]), helper.make_node("MatMul", ["xb", "wd1"], ["y2"]),
             helper.make_node("QuantizeLinear", ["x", "s", "z2"], ["q_out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 4]) for n in ("y1", "y2")]
                              + [helper.make_tensor_value_info("q_out", TensorProto.INT8, [3, 8])], inits,
                              value_info=[helper.make_tensor_value_info("xq", TensorProto.INT8, [3, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path))


def test_activation_pairs_become_uint8_with_the_same_outputs(tmp_path):
    source = tmp_path / "qdq.onnx"
    _graph(source)
    copy = u8_activations(source)
    assert copy is not None and copy.parent == source.parent  # beside the source: its weights file resolves
    converted = onnx.load(str(copy)).graph
    by_output = {n.output[0]: n for n in converted.node}
    zero = {i.name: i for i in converted.initializer}
    assert zero[by_output["xq"].input[2]].data_type == TensorProto.UINT8
    assert by_output["xa"].input[2] == by_output["xb"].input[2] == by_output["xq"].input[2]
    assert by_output["q_out"].input[2] == "z2"  # a graph output keeps its declared int8
    assert by_output["wd0"].input[2] == "wz" and "z" not in zero  # weights untouched; the old zero point dropped
    x = np.random.default_rng(1).normal(0, 1, (3, 8)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written, no int8 kernels

    def run(path):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})

    for got, want in zip(run(copy), run(source)):  # the same numbers, exactly
        np.testing.assert_array_equal(got, want)
    assert onnx.load(str(source)).graph == onnx.load(str(source)).graph  # source read, never written
    assert u8_activations(copy) is None  # nothing left to convert


def test_a_graph_without_int8_activation_pairs_is_left_alone(tmp_path):
    source = tmp_path / "qdq.onnx"
    _graph(source)
    model = onnx.load(str(source))
    for init in model.graph.initializer:
        if init.name in ("z", "z2"):
            init.CopyFrom(numpy_helper.from_array(np.uint8(128), init.name))
    model.graph.ClearField("value_info")
    model.graph.output[2].type.tensor_type.elem_type = TensorProto.UINT8
    onnx.save(model, str(source))
    assert u8_activations(source) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.onnx"]
