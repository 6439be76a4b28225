"""Is an ONNX graph ready for TensorRT's ONNX parser? Checked on a CPU, without TensorRT.

The table export/data/trt_onnx_operators.json is onnx-tensorrt's docs/operators.md for the TensorRT
version it names (ops, their supported dtypes and restrictions, the opset range). Keep it current
with the TensorRT version you target. A finding names the node, its op and what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import onnx

# ONNX TensorProto element type → the table's dtype names.
_DTYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
                11: "DOUBLE", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4"}
# Parsed fine by TensorRT but known to break or silently slow builds of these graphs.
_KNOWN_BAD = {"SplitToSequence", "SequenceAt", "SequenceConstruct", "ConcatFromSequence", "Loop", "If"}


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"node '{self.node}' ({self.op}): {self.problem}"


@lru_cache(maxsize=1)
def operator_table() -> dict:
    return json.loads(resources.files("sprintrt.export").joinpath("data/trt_onnx_operators.json").read_text())


def _opset_range(table: dict) -> tuple[int, int]:
    lo, hi = map(int, re.findall(r"opset (\d+)", table["opset_range"]))
    return lo, hi


def lint(model: onnx.ModelProto | str | Path) -> list[Finding]:
    """Every reason TensorRT's parser would reject (or mis-build) this graph; empty when it is ready."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = operator_table()
    ops = table["operators"]
    findings = []
    lo, hi = _opset_range(table)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            findings.append(Finding("<model>", "opset", f"opset {imp.version} is outside TensorRT "
                                    f"{table['trt_version']}'s range {lo}..{hi}"))
    types = _tensor_types(model)
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding(name, f"{node.domain}.{node.op_type}", "custom-domain op: needs a TensorRT plugin"))
            continue
        if node.op_type in _KNOWN_BAD:
            findings.append(Finding(name, node.op_type, "sequence/control-flow op: TensorRT cannot parse or "
                                    "build it efficiently; it must be folded or rewritten before the build"))
            continue
        entry = ops.get(node.op_type)
        if entry is None or not entry["supported"]:
            findings.append(Finding(name, node.op_type, f"not supported by TensorRT {table['trt_version']}'s ONNX parser"))
            continue
        if node.op_type in ("Constant", "Shape", "Cast", "QuantizeLinear", "DequantizeLinear"):
            continue  # their dtype rules are about outputs/quantized types, not listed per input
        allowed = set(entry["dtypes"])
        for tensor in node.input[:1]:  # the data input; shape/index inputs follow other rules
            dtype = types.get(tensor)
            if dtype is not None and allowed and _DTYPE_NAMES.get(dtype, str(dtype)) not in allowed:
                findings.append(Finding(name, node.op_type, f"input '{tensor}' is {_DTYPE_NAMES.get(dtype, dtype)}; "
                                        f"TensorRT supports {sorted(allowed)} for {node.op_type}"))
    return findings


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    from sprintrt.export.graph_passes import inferred_skeleton

    try:
        inferred = inferred_skeleton(model)
    except Exception:  # e.g. an op of an unknown domain: the op findings still stand, dtypes go unchecked
        inferred = model
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types
