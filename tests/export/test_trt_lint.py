"""The TensorRT-readiness lint catches what TensorRT's ONNX parser would reject, naming node and op."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from sprintrt import specs as S
from sprintrt.export.graph_passes import sequences_to_split
from sprintrt.export.onnx_export import trace_to_onnx
from sprintrt.export.trt_lint import lint, operator_table


def _model(nodes, opset=18, inputs=None, outputs=None):
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_table_is_tensorrt_11_1():
    table = operator_table()
    assert table["trt_version"] == "11.1" and len(table["operators"]) == table["operator_count"]


def test_clean_graph_passes():
    assert lint(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")])) == []


def test_planted_unsupported_op_is_named():
    findings = lint(_model([helper.make_node("Unique", ["x"], ["y"], name="planted_unique")], opset=18))
    assert [f.node for f in findings] == ["planted_unique"]
    assert "not supported" in findings[0].problem and findings[0].op == "Unique"


def test_sequence_ops_and_custom_domains_are_caught():
    nodes = [helper.make_node("SplitToSequence", ["x"], ["s"], name="split_seq", axis=0),
             helper.make_node("SequenceAt", ["s", "i"], ["y"], name="seq_at"),
             helper.make_node("Constant", [], ["i"], value=helper.make_tensor("i", TensorProto.INT64, [], [0]))]
    found = {f.node: f.problem for f in lint(_model(nodes))}
    assert "split_seq" in found and "seq_at" in found
    custom = helper.make_node("Foo", ["x"], ["y"], name="custom", domain="com.example")
    assert "plugin" in lint(_model([custom]))[0].problem


def test_opset_and_dtype_are_checked():
    assert "outside" in lint(_model([helper.make_node("Relu", ["x"], ["y"])], opset=25))[0].problem
    dbl = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [4])
    findings = lint(_model([helper.make_node("Relu", ["x"], ["y"], name="relu64")], inputs=[dbl],
                           outputs=[helper.make_tensor_value_info("y", TensorProto.DOUBLE, [4])]))
    assert findings and findings[0].node == "relu64" and "DOUBLE" in findings[0].problem


class _Chunky(torch.nn.Module):
    def forward(self, x):
        a, b, c = x.chunk(3, dim=1)
        return (a * torch.sigmoid(b) + c,)


def test_chunk_exports_as_split_and_matches_torch():
    batch, n = S.Dim("batch", 1, 1, 4, 2, (3,)), S.Dim("n", 1, 8, 64, 6, (5,))
    spec = S.ComponentSpec("chunky", inputs=(S.TensorSpec("x", "float32", (batch, 12, n)),),
                           outputs=(S.TensorSpec("y", "float32", ()),))
    proto = trace_to_onnx(_Chunky(), spec)
    ops = {node.op_type for node in proto.graph.node}
    assert "Split" in ops and not ops & {"SplitToSequence", "SequenceAt"}
    x = np.random.default_rng(0).standard_normal((3, 12, 5)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - _Chunky()(torch.from_numpy(x))[0].numpy()).max() < 1e-6
    assert sequences_to_split(proto) == 0  # idempotent: nothing left to rewrite
