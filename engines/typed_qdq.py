"""Q/DQ on a 16-bit base: the calibrated int8/fp8 quantization of the fp32 graph carried onto the export's
typed bf16/fp16 variant, so that on TensorRT (strongly typed) every layer that is not quantized runs in
16 bit instead of fp32. This is how NVIDIA ModelOpt's recipes deploy diffusion models (quantize, then
export in the model's 16-bit dtype); ONNX Runtime cannot calibrate a bf16 graph on a CPU, so the ranges
come from the fp32 graph and only the Q/DQ pairs move.

How layers are matched: the fp32 graph and the typed variant are exports of the same model, so their
weight layers (MatMul/Gemm/Conv with a constant weight) come in the same order with the same op type and
the same innermost module name (the module path the exporter records); any difference is an error, never
a guess. For each layer the fp32 Q/DQ graph quantized:
- weight: the int8/fp8 weight, its per-channel scale (in the variant's dtype) and zero point, and a
  DequantizeLinear (same axis) replace the variant's 16-bit weight;
- activation: QuantizeLinear -> DequantizeLinear with the calibrated scale (in the variant's dtype).
The graph's opset is raised to 19 where needed (QuantizeLinear/DequantizeLinear take 16-bit scales from
opset 19; TensorRT's table lists QuantizeLinear for FP32/FP16/BF16 inputs). Layers kept in higher
precision stay exactly as the variant has them.
"""

from __future__ import annotations

import os
from pathlib import Path

from sprintrt.errors import ModelLoadError
from sprintrt.files import EXTERNAL_DATA_BYTES

QDQ_MIN_OPSET = 19
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def weight_layers(model) -> list:
    """The MatMul/Gemm/Conv nodes whose second input is a constant, in graph order."""
    weights = {i.name for i in model.graph.initializer}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in weights]


def _leaf(scope: str) -> str:
    """'…decoder.conv_in.conv2d' → 'conv_in': the innermost module's own name."""
    return scope.rsplit(".", 1)[0].rsplit(".", 1)[-1]


def pair_layers(fp32, typed) -> list[tuple]:
    """[(fp32 node, typed node)] of the two graphs' weight layers; a typed error if they differ."""
    from sprintrt.onnx_scopes import module_scopes

    a, b = weight_layers(fp32), weight_layers(typed)
    sa, sb = module_scopes(fp32), module_scopes(typed)
    if len(a) != len(b):
        raise ModelLoadError(f"the typed variant has {len(b)} weight layers, the fp32 graph {len(a)}: they are not "
                             "exports of the same model. Fix: export both again with `sprintrt export`")
    for x, y in zip(a, b):
        kx, ky = (x.op_type, _leaf(sa.get(x.output[0], "?"))), (y.op_type, _leaf(sb.get(y.output[0], "?")))
        if kx != ky:
            raise ModelLoadError(f"weight layer {x.name} ({kx}) of the fp32 graph has no counterpart in the typed "
                                 f"variant (found {ky}). Fix: export both again with `sprintrt export`")
    return list(zip(a, b))


def qdq_on_variant(qdq_path: Path, fp32_path: Path, variant_path: Path, out: Path, dtype: str) -> dict:
    """Write to `out` the typed variant with the Q/DQ pairs of `qdq_path` (the quantized fp32 graph).
    Returns {"qdq_base": dtype, "qdq_layers": count}."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16}[dtype]
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    qdq = onnx.load(str(qdq_path))
    typed = onnx.load(str(variant_path))
    pairs = pair_layers(fp32, typed)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    qdq_nodes = {n.name: n for n in qdq.graph.node}
    inits = {i.name: i for i in qdq.graph.initializer}
    typed_weights = {i.name: i for i in typed.graph.initializer}

    def scale(name: str, src: str):
        values = numpy_helper.to_array(inits[src]).astype("float32")
        return helper.make_tensor(name, elem, values.shape, values.ravel().tolist())

    def copy(name: str, src: str):
        t = onnx.TensorProto()
        t.CopyFrom(inits[src])
        t.name = name
        return t

    before: dict[str, list] = {}
    added = []
    count = 0
    for a, b in pairs:
        node = qdq_nodes.get(a.name)
        if node is None:
            raise ModelLoadError(f"{qdq_path} has no node {a.name}: it was not quantized from {fp32_path}")
        dq_w, dq_x = producer.get(node.input[1]), producer.get(node.input[0])
        if dq_w is None or dq_w.op_type != "DequantizeLinear":
            continue  # kept in higher precision: the variant's 16-bit layer stays as it is
        q_x = producer[dq_x.input[0]]
        w_shape = list(inits[dq_w.input[0]].dims)
        typed_w = typed_weights.get(b.input[1])
        if typed_w is not None and list(typed_w.dims) != w_shape:
            raise ModelLoadError(f"weight of {b.name} has shape {list(typed_w.dims)} in the typed variant, {w_shape} "
                                 "in the fp32 graph. Fix: export both again with `sprintrt export`")
        p = b.name
        added += [copy(f"{p}.w_q", dq_w.input[0]), scale(f"{p}.w_scale", dq_w.input[1]),
                  copy(f"{p}.w_zero", dq_w.input[2]), scale(f"{p}.x_scale", q_x.input[1]),
                  copy(f"{p}.x_zero", q_x.input[2])]
        axis = [attr for attr in dq_w.attribute if attr.name == "axis"]
        before[b.name] = [
            helper.make_node("DequantizeLinear", [f"{p}.w_q", f"{p}.w_scale", f"{p}.w_zero"], [f"{p}.w_dq"],
                             name=f"{p}.w_dq", **({"axis": axis[0].i} if axis else {})),
            helper.make_node("QuantizeLinear", [b.input[0], f"{p}.x_scale", f"{p}.x_zero"], [f"{p}.x_q"],
                             name=f"{p}.x_q"),
            helper.make_node("DequantizeLinear", [f"{p}.x_q", f"{p}.x_scale", f"{p}.x_zero"], [f"{p}.x_dq"],
                             name=f"{p}.x_dq"),
        ]
        b.input[0], b.input[1] = f"{p}.x_dq", f"{p}.w_dq"
        count += 1
    rewrite_and_save(typed, before, added, out)
    return {"qdq_base": dtype, "qdq_layers": count}


def rewrite_and_save(model, before: dict[str, list], added: list, out: Path) -> None:
    """Insert `before[node name]` ahead of each such node, add the `added` initializers and drop those no node
    reads any more (the 16-bit weights the Q/DQ replaced), raise the opset to QDQ_MIN_OPSET (16-bit Q/DQ scales
    need 19), and save `model` to `out` (save_model)."""
    nodes = []
    for n in model.graph.node:
        nodes += before.get(n.name, [])
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < QDQ_MIN_OPSET:
            entry.version = QDQ_MIN_OPSET
    save_model(model, out)


def save_model(model, out: Path) -> None:
    """Save under a temporary name, then rename; external weights beside it when the model is large."""
    import onnx

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    try:
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
