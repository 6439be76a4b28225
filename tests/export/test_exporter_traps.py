"""Regression tests for the exporter traps measured on SANA-Sprint. Each fails if its trap comes back."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

from sprintrt import specs as S
from sprintrt.export.graph_passes import typed_list_constants
from sprintrt.export.onnx_export import trace_to_onnx
from sprintrt.export.wrappers import BroadcastMaskSanaAttnProcessor, TransformerWrapper


def test_broadcast_mask_processor_equals_diffusers_processor():
    """Trap 1: diffusers' cross-attention `.view`s a per-head repeated mask, which the dynamo exporter
    cannot trace; our processor broadcasts the mask instead and must compute the same thing."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=16, heads=2, kv_heads=2, dim_head=8, bias=True,
                     qk_norm="rms_norm_across_heads", processor=SanaAttnProcessor2_0()).eval()  # as SanaTransformerBlock.attn2
    x, ctx = torch.randn(3, 10, 16), torch.randn(3, 7, 16)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6])
    bias = ((1 - mask.float()) * -10000.0).unsqueeze(1)
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx, attention_mask=bias)
        attn.set_processor(BroadcastMaskSanaAttnProcessor())
        ours = attn(x, encoder_hidden_states=ctx, attention_mask=bias)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_export_wrapper_uses_broadcast_mask_processor(reference_pipe):
    wrapper = TransformerWrapper(reference_pipe.transformer)
    procs = [b.attn2.processor for b in wrapper.transformer.transformer_blocks]
    assert procs and all(isinstance(p, BroadcastMaskSanaAttnProcessor) for p in procs)


class _LinearAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(query_dim=16, heads=2, dim_head=8, bias=False, processor=SanaLinearAttnProcessor2_0())

    def forward(self, x):
        return (self.attn(x),)


def test_linear_attention_epsilon_survives_export():
    """Trap 2: the exporter's optimize=True drops the +1e-15 of the linear-attention normaliser, so an
    all-zero key column divides 0 by 0. Measured: optimize=True gives NaN here, our path gives 0."""
    module = _LinearAttention().eval()
    x = S.Dim("tokens", 1, 8, 64, sample=6, probes=(5,))
    spec = S.ComponentSpec("linear_attention", inputs=(S.TensorSpec("x", "float32", (S.Dim("batch", 1, 1, 4, 2, (1,)), x, 16)),),
                           outputs=(S.TensorSpec("y", "float32", ()),))
    proto = trace_to_onnx(module, spec)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 5, 16), np.float32)  # ReLU(k) = 0 everywhere: the denominator is exactly 0
    y = sess.run(None, {"x": zeros})[0]
    with torch.no_grad():
        ref = module(torch.from_numpy(zeros))[0].numpy()
    assert np.isfinite(ref).all()
    assert np.isfinite(y).all()
    assert np.abs(y - ref).max() < 1e-6


def test_transformer_graph_keeps_the_epsilon(onnx_dir):
    model = onnx.load(str(onnx_dir / "transformer.onnx"))
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    eps_adds = [n for n in model.graph.node if n.op_type == "Add"
                and any(i in consts and consts[i].size == 1 and np.isclose(consts[i].item(), 1e-15, rtol=1e-3, atol=0)
                        for i in n.input)]
    blocks = 2  # the tiny transformer's num_layers: one linear attention per block
    assert len(eps_adds) == blocks


@pytest.mark.parametrize("name", S.COMPONENTS)
def test_no_negative_transpose_perms(onnx_dir, name):
    """Trap 3: the legacy TorchScript exporter writes negative Transpose perms in the DC-AE decoder,
    which ONNX Runtime rejects. Every perm must be a permutation of 0..rank-1."""
    model = onnx.load(str(onnx_dir / f"{name}.onnx"))
    for n in model.graph.node:
        if n.op_type == "Transpose":
            perm = list(onnx.helper.get_attribute_value(n.attribute[0]))
            assert sorted(perm) == list(range(len(perm))), (n.name, perm)


def test_empty_int_list_constants_stay_int64():
    """Trap 4: onnx-graphsurgeon reads Constant(value_ints=[]) as float64, so constant folding feeds a
    double shape to Expand (torch.zeros([]) in Gemma2's mask code) and ORT refuses the graph."""
    from onnx import TensorProto, helper
    from polygraphy.backend.onnx import fold_constants

    empty_shape = helper.make_node("Constant", [], ["shape"])
    empty_shape.attribute.append(onnx.AttributeProto(name="value_ints", type=onnx.AttributeProto.INTS))
    graph = helper.make_graph(
        [empty_shape,
         helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
         helper.make_node("Expand", ["zero", "shape"], ["e"]),
         helper.make_node("Add", ["x", "e"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert typed_list_constants(model) == 1
    folded = fold_constants(model, fold_shapes=True)
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones(2, np.float32)})[0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name", S.COMPONENTS)
def test_exports_are_tensorrt_ready(onnx_dir, name):
    """Trap 5: optimize=False leaves SplitToSequence/SequenceAt (TensorRT rejects them) and a DOUBLE
    CastLike from F.pad(value=1.0); the export's graph passes must remove both."""
    from sprintrt.export.trt_lint import lint

    assert [str(f) for f in lint(onnx_dir / f"{name}.onnx")] == []
    info = __import__("json").loads((onnx_dir / "export_info.json").read_text())
    assert info["components"][name]["trt_lint"] == []


def _transpose_chain(perms, extra_reader: bool = False) -> onnx.ModelProto:
    h = onnx.helper
    nodes, prev = [], "x"
    for i, perm in enumerate(perms):
        nodes.append(h.make_node("Transpose", [prev], [f"t{i}"], perm=perm, name=f"T{i}"))
        prev = f"t{i}"
    nodes.append(h.make_node("Relu", [prev], ["y"]))
    outputs = [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None] * 4)]
    if extra_reader:  # someone else reads the first transpose too
        nodes.append(h.make_node("Neg", ["t0"], ["z"]))
        outputs.append(h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [None] * 4))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 5])], outputs)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("perms, extra_reader, left", [
    (([0, 2, 3, 1], [0, 3, 1, 2]), False, 0),  # NCHW -> NHWC -> NCHW: both go
    (([0, 2, 3, 1], [0, 3, 1, 2]), True, 1),  # the first stays for its other reader
    (([0, 2, 3, 1], [0, 2, 3, 1]), False, 2),  # not inverse: kept
    (([0, 1, 3, 2], [0, 1, 3, 2]), False, 0),  # a self-inverse swap
    (([0, 3, 1, 2], [0, 2, 3, 1], [0, 3, 1, 2]), False, 1),  # a chain of three: one is the net effect
])
def test_cancel_transpose_pairs_keeps_the_computation(perms, extra_reader, left):
    from sprintrt.export.graph_passes import cancel_transpose_pairs

    proto = _transpose_chain(perms, extra_reader)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    cancel_transpose_pairs(proto)
    onnx.checker.check_model(proto)
    assert sum(n.op_type == "Transpose" for n in proto.graph.node) == left
    after = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
