"""int8 weight-only ONNX graphs: each weight layer's weights as int8 behind a DequantizeLinear, the activations
left as they are.

What TensorRT-RTX runs as weight-only int8 GEMMs (its "INT8 WoQ"), from the export's 16-bit variant: per output
channel symmetric int8 weights (scale = max |w| / 127 per channel, no zero point) and a DequantizeLinear to the
variant's own 16-bit type in front of the layer, so the layer computes in 16 bit on int8-stored weights (half
the weight bytes to read). No calibration data: only weights change. OpenVINO's int8w is the same idea done by
NNCF on its IR (engines/ov_build.py).

Which layers: every MatMul / Gemm / Conv reading a weight initializer, except those each component keeps in
higher precision (engines/quantize.py's KEEP_HIGH_PRECISION: the int8 recipes' lists).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sprintrt.engines.quantize import quantizable_nodes
from sprintrt.engines.typed_qdq import rewrite_and_save

QMAX = 127  # symmetric: -127..127, so the scale maps max |w| exactly and no zero point is needed


def per_channel_int8(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scale per channel along `axis`) with weights ≈ int8 * scale."""
    w = np.asarray(weights, dtype=np.float32)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.max(np.abs(w), axis=reduce)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)  # an all-zero channel stays zero
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -QMAX, QMAX).astype(np.int8)
    return q, scale


def _channel_axis(node, weight_rank: int) -> int:
    """The output-channel axis of a layer's weight: Conv [out, in, kh, kw] → 0; MatMul [in, out] → last;
    Gemm → 0 with transB=1 ([out, in]), else 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return weight_rank - 1


def weight_only_int8(source: Path, out: Path, component: str) -> dict:
    """Write to `out` the graph `source` (an fp32 graph or a 16-bit variant) with int8 weight-only layers.
    Returns {"int8w_layers": count, "int8w_kept": count}."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    quantize, kept = quantizable_nodes(model, component)  # the int8 recipes' kept layers stay 16-bit
    inits = {i.name: i for i in model.graph.initializer}
    before: dict[str, list] = {}
    added = []
    for node in model.graph.node:
        if node.name not in quantize or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init)
        axis = _channel_axis(node, w.ndim)
        q, scale = per_channel_int8(w.astype(np.float32), axis)
        p = node.name
        added += [numpy_helper.from_array(q, f"{p}.w_int8"),
                  helper.make_tensor(f"{p}.w_scale", init.data_type, scale.shape, scale.tolist())]  # the weight's type
        before[node.name] = [helper.make_node("DequantizeLinear", [f"{p}.w_int8", f"{p}.w_scale"], [f"{p}.w_dq"],
                                             name=f"{p}.w_dq", axis=axis)]
        node.input[1] = f"{p}.w_dq"
    rewrite_and_save(model, before, added, out)
    return {"int8w_layers": len(before), "int8w_kept": len(kept)}
