"""16-bit (bf16 / fp16) variants of each exported component, with their fp32 islands declared once here.

TensorRT 11 has no weak typing: a bf16 or fp16 engine needs a graph that carries those types. Each
variant is the component traced in its torch dtype (as NVIDIA's demoDiffusion does), which keeps the
fp32 islands diffusers and transformers compute on purpose, with fp32 inputs and outputs (Casts at
the edges, so the runtime and the manifest I/O do not change):

- transformer: SANA's linear attention upcasts q, k, v to fp32 (SanaLinearAttnProcessor2_0): its
  matmuls, the normaliser division and the 1e-15 epsilon stay fp32 (in fp16 the epsilon flushes to 0
  and an all-zero key column gives 0/0 = NaN; the sums pass 65504); RMSNorm variances in fp32; the
  timestep enters in fp32 (diffusers' pipeline never casts it).
- text_encoder (bf16 only; Gemma2 overflows fp16, its docs say bf16): eager attention's softmax and
  the RMSNorm variances in fp32.
- vae_decoder / vae_encoder: DC-AE's RMSNorm variances in fp32 (they overflow fp16; its authors force
  them to fp32), and the image-side Resize in fp32 where there is one.

Mechanism, chosen by measurement: a typed torch export (the modules' own upcasts become fp32 nodes)
needs no converter and no block lists that drift from the model code; onnxconverter-common's float16
converter has no bf16, and ModelOpt AutoCast pins an older onnx. `check_islands` verifies the islands
in every exported variant, so a model change that drops one fails the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sprintrt import specs as S
from sprintrt.defaults import EXPORT_DTYPES as DTYPES
from sprintrt.errors import ExportValidationError, InvalidInputError


@dataclass(frozen=True)
class VariantRule:
    dtypes: tuple[str, ...]  # the 16-bit variants this component may have
    cast_inputs: tuple[str, ...]  # float inputs cast to the variant dtype (the rest stay as given)
    islands: str  # what must stay fp32, in words (export_info and errors quote it)
    min_cosine: dict  # per dtype: the least cosine of each output to PyTorch fp32 at the validation shapes


# Measured on the tiny checkpoint (cosine to fp32 PyTorch, worst output over the validation shapes):
# see tests/export/test_typed.py; each bound leaves a margin and still fails a broken graph (< 0.9).
RULES = {
    S.TEXT_ENCODER: VariantRule(("bf16",), ("past_key_values",), "eager-attention softmax, RMSNorm variances",
                                {"bf16": 0.99}),
    S.TRANSFORMER: VariantRule(("bf16", "fp16"), ("hidden_states", "encoder_hidden_states", "guidance"),
                               "linear attention (matmuls, normaliser division, 1e-15 epsilon), RMSNorm variances",
                               {"bf16": 0.99, "fp16": 0.999}),
    S.VAE_DECODER: VariantRule(("bf16", "fp16"), ("latent",), "RMSNorm variances", {"bf16": 0.99, "fp16": 0.999}),
    S.VAE_ENCODER: VariantRule(("bf16", "fp16"), ("sample",), "RMSNorm variances", {"bf16": 0.99, "fp16": 0.999}),
    # SANA transformer blocks like the transformer's: the same islands. diffusers' ControlNet pipeline casts the
    # latents and prompt to the ControlNet's dtype and the residuals to the transformer's.
    S.CONTROLNET: VariantRule(("bf16", "fp16"), ("hidden_states", "encoder_hidden_states", "controlnet_cond",
                                                 "conditioning_scale"),
                              "linear attention (matmuls, normaliser division, 1e-15 epsilon), RMSNorm variances",
                              {"bf16": 0.99, "fp16": 0.999}),
    S.CONTROLLED_TRANSFORMER: VariantRule(("bf16", "fp16"), ("hidden_states", "encoder_hidden_states", "guidance",
                                                             "block_samples"),
                                          "linear attention (matmuls, normaliser division, 1e-15 epsilon), RMSNorm "
                                          "variances", {"bf16": 0.99, "fp16": 0.999}),
}


def parse_dtypes(value) -> tuple[str, ...]:
    """'fp32,bf16' → ('fp32', 'bf16'); fp32 is always exported."""
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in DTYPES]
    if bad:
        raise InvalidInputError(f"dtypes={value!r} is not allowed: expected a comma-separated subset of {list(DTYPES)}. "
                                "Fix: e.g. --dtypes fp32,bf16,fp16")
    return tuple(dict.fromkeys(["fp32", *items]))


def variant_dtypes(component: str, dtypes) -> tuple[str, ...]:
    """The 16-bit variants of `component` among `dtypes` (Gemma2 gets no fp16: it overflows)."""
    return tuple(d for d in dtypes if d != "fp32" and d in RULES[component].dtypes)


def torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def typed_wrapper(module, component: str, dtype: str, spec: S.ComponentSpec):
    """The export wrapper of a component loaded in `dtype`: casts the inputs diffusers casts, returns fp32."""
    import torch
    from torch import nn

    rule, target = RULES[component], torch_dtype(dtype)
    cast = tuple(t.name in rule.cast_inputs for t in spec.inputs)

    class Typed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def run(self, args):
            args = tuple(a.to(target) if c else a for a, c in zip(args, cast))
            return tuple(o.to(torch.float32) for o in self.inner(*args))

    # The exporter needs a fixed positional signature (one parameter per spec input), not *args.
    class Typed1(Typed):
        def forward(self, a):
            return self.run((a,))

    class Typed4(Typed):
        def forward(self, a, b, c, d):
            return self.run((a, b, c, d))

    class Typed5(Typed):
        def forward(self, a, b, c, d, e):
            return self.run((a, b, c, d, e))

    class Typed6(Typed):
        def forward(self, a, b, c, d, e, f):
            return self.run((a, b, c, d, e, f))

    return {1: Typed1, 4: Typed4, 5: Typed5, 6: Typed6}[len(spec.inputs)]().eval()


# ---- the islands, checked on the exported graph --------------------------------------------------------

def _elem_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def linear_attention_nodes(model) -> list[str]:
    """The nodes of SANA's linear attention normaliser: from each Add of the 1e-15 epsilon, its Div and back
    through the two matmuls (v·kᵀ, then ·q)."""
    from sprintrt.export.graph_passes import constant_values

    nodes = list(model.graph.node)
    consts = constant_values(model)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found: list[str] = []
    ops = {"Slice", "Add", "Div", "MatMul", "Cast", "Transpose", "Reshape", "Unsqueeze", "Pad"}
    for add in nodes:
        if add.op_type != "Add" or not any(
                i in consts and consts[i].size == 1
                and np.isclose(float(consts[i].astype(np.float64).ravel()[0]), 1e-15, rtol=1e-3, atol=0)
                for i in add.input):
            continue
        stack, seen = [(n, 0) for n in consumers.get(add.output[0], []) if n.op_type == "Div"], set()
        found.append(add.name)
        while stack:
            node, matmuls = stack.pop()
            if node.name in seen or node.op_type not in ops:
                continue
            seen.add(node.name)
            found.append(node.name)
            matmuls += node.op_type == "MatMul"
            if matmuls < 2:
                stack.extend((producer[i], matmuls) for i in node.input if i in producer)
    return found


def island_nodes(model, component: str) -> list[str]:
    """The nodes that must compute in fp32 in a 16-bit variant of `component`."""
    islands = [n.name for n in model.graph.node if n.op_type in ("ReduceMean", "Softmax", "Resize")]
    if component in S.TRANSFORMER_FAMILY:
        islands += linear_attention_nodes(model)
    return islands


def enforce_islands(model, component: str) -> int:
    """Make every island node compute in fp32: Cast its 16-bit float inputs up and its outputs back (the
    injected-Cast approach of ModelOpt's AutoCast). Needed where the exporter drops an upcast the model
    asks for (measured: Gemma2's softmax(..., dtype=float32) exported as a bf16 Softmax). Returns the
    number of nodes changed."""
    import onnx
    from onnx import helper

    types = _elem_types(model)
    sixteen = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    islands = set(island_nodes(model, component))
    nodes, changed = [], 0
    for node in model.graph.node:
        low = [i for i in node.input if types.get(i) in sixteen]
        if node.name not in islands or not low:
            nodes.append(node)
            continue
        changed += 1
        for k, name in enumerate(node.input):
            if name in low:
                up = f"{name}__fp32_for_{node.name}"
                nodes.append(helper.make_node("Cast", [name], [up], to=onnx.TensorProto.FLOAT,
                                              name=f"{node.name}__island_in{k}"))
                node.input[k] = up
        back = []
        for k, name in enumerate(node.output):
            original = types.get(name, types[low[0]])
            node.output[k] = f"{name}__fp32"
            back.append(helper.make_node("Cast", [node.output[k]], [name], to=original,
                                         name=f"{node.name}__island_out{k}"))
        nodes += [node, *back]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return changed


def check_islands(model, component: str, dtype: str) -> dict:
    """Raise ExportValidationError if a declared fp32 island computes in 16 bits. Returns what is fp32."""
    import onnx

    types = _elem_types(model)
    by_name = {n.name: n for n in model.graph.node}
    islands = island_nodes(model, component)
    float_out = {n.name for n in model.graph.node if n.output and types.get(n.output[0]) == onnx.TensorProto.FLOAT}
    # Casts that only produce the fp32 outputs are edges, not islands; shape arithmetic is not math.
    wrong = [name for name in islands if name not in float_out
             and types.get(by_name[name].output[0]) in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    if component in S.TRANSFORMER_FAMILY and not linear_attention_nodes(model):
        wrong.append("the linear attention's 1e-15 epsilon (not found: it was folded away or flushed to 0)")
    if wrong:
        raise ExportValidationError(
            f"{component} {dtype}: {len(wrong)} node(s) that must stay fp32 ({RULES[component].islands}) compute in "
            f"{dtype}, e.g. {wrong[:3]}. The variant would overflow or divide by zero; do not ship it. Fix: report "
            "this with the diffusers/transformers versions (a model change dropped an fp32 upcast)")
    counts: dict[str, int] = {}
    for name in float_out:
        op = by_name[name].op_type
        counts[op] = counts.get(op, 0) + 1
    return {"islands": RULES[component].islands, "island_nodes": len(islands),
            "fp32_nodes_by_op": dict(sorted(counts.items()))}
