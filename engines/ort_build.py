"""ONNX Runtime "engines": the source graph optimised by ORT for this CPU and saved.

ORT's full optimisation level (ORT_ENABLE_ALL) fuses attention/LayerNorm/GELU and rewrites
convolutions into the blocked NCHWc layout of this CPU's vector width, so the saved graph is tied to
the CPU's ISA and to the ORT version, which the manifest records and the loader checks. Loading a
saved graph then skips optimisation, which is most of ORT's session start-up time on big graphs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from sprintrt import machine
from sprintrt.engines.precision import Precision as P, components_in
from sprintrt.engines.profiles import full_profile
from sprintrt.engines.registry import BuildResult, refuse_target_request
from sprintrt.errors import MissingDependencyError
from sprintrt.files import EXTERNAL_DATA_BYTES
from sprintrt.specs import CONTROLLED_TRANSFORMER, CONTROLNET, COMPONENTS, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER

NAME = "onnxruntime"
LIBRARY = "onnxruntime"
SUFFIX = ".ort.onnx"
DEVICE = "cpu"
PROVIDER = "CPUExecutionProvider"
# fp32; fp16 from the export's typed variants (not Gemma2); int8 from Q/DQ graphs for the components with a recipe.
ALLOWED = {TEXT_ENCODER: (P.FP32, P.INT8), TRANSFORMER: (P.FP32, P.FP16, P.INT8),
           VAE_DECODER: (P.FP32, P.FP16, P.INT8), VAE_ENCODER: (P.FP32, P.FP16, P.INT8),
           CONTROLNET: (P.FP32, P.FP16, P.INT8), CONTROLLED_TRANSFORMER: (P.FP32, P.FP16, P.INT8)}
# fp16 engines run the export's typed fp16 variant (ORT's CPU provider runs fp16 graphs; it has no bf16 Conv).
TYPED_PRECISIONS = frozenset({P.FP16})
VARIANT_OPTIONAL: frozenset = frozenset()  # fp16 needs the typed graph
PRECISION_LIBRARIES: dict = {}
KEY_REVISIONS = {P.INT8: "u8act"}  # int8: activations' Q/DQ pairs made uint8 before optimising (u8_activations)


def build_target(requested: str | None = None) -> dict:
    refuse_target_request(NAME, requested)
    return machine.cpu_target()


def library_versions() -> dict:
    version = machine.library_version("onnxruntime")
    if version is None:
        raise MissingDependencyError("the onnxruntime backend needs the 'onnxruntime' package. Fix: pip install "
                                     "onnxruntime (never together with onnxruntime-gpu)")
    return {LIBRARY: version}


def auto_preference() -> int:
    """The fallback everywhere it is installed (OpenVINO wins on bf16 CPUs, TensorRT on NVIDIA GPUs)."""
    return 1 if machine.library_version(LIBRARY) else 0


def capabilities(target: Mapping) -> str:
    int8 = f"int8 (Q/DQ: {components_in(ALLOWED, P.INT8)})"
    if not machine.cpu_has_int8_dot(dict(target)):
        int8 += " with 7-bit weights (no VNNI: 8-bit int8 kernels saturate)"
    return f"fp32, fp16 (typed variants), {int8} (CPU, {PROVIDER})"


def default_precisions(versions: Mapping | None = None, target: Mapping | None = None) -> dict:
    return {c: P.FP32 for c in COMPONENTS}  # the CPU provider has no bf16 kernels


def quantized_base(component: str, target: Mapping, precision: P):
    """None: int8 layers run ORT's int8 kernels and the rest fp32 (its CPU provider has no bf16)."""
    return None


def check_buildable(component: str, precision: P, export_record: Mapping, versions: Mapping,
                    target: Mapping) -> None:
    """Everything ONNX Runtime cannot build is already refused by the precision table."""


def profile(spec, model, options) -> dict:
    return full_profile(spec)  # ORT sessions take any shape in the spec's ranges


def u8_activations(source: Path) -> Path | None:
    """A copy of the Q/DQ graph `source` whose int8 activation pairs (QuantizeLinear and the DequantizeLinears
    reading it) are uint8 with the zero point moved by 128: the same numbers (q + 128, dequantized minus 128), which
    ONNX Runtime's CPU kernels take (VNNI's dot product is u8 x s8 too). ORT rewrites s8 pairs itself, but not one
    QuantizeLinear read by several layers (Gemma2's q/k/v and gate/up projections, the transformer's q/k/v): those
    MatMuls stayed float, on weights dequantized at every call. Measured at real size (0.6B, random weights, ORT
    1.31.1, 2-vCPU AMX Xeon): text encoder int8 3.45 s with s8 pairs (52 of 182 weight MatMuls fused) vs 0.12 s
    with u8 (182 of 182; fp32 0.42 s); transformer at 512² 1.61 s vs 0.51 s (fp32 1.16 s). The shared graph
    keeps s8 pairs: OpenVINO's int8 kernels are faster with them (real DC-AE decoder, uniform int8 at 512²: 0.90 s
    s8, 1.18 s u8) and TensorRT takes signed int8 only. Graphs quantized for AVX2 CPUs already have u8
    activations. None where nothing changes; else the copy, beside `source` (its weights file is found relative
    to it), which the caller removes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    moved: dict[str, str] = {}  # int8 zero point -> its uint8 copy
    converted = set()  # the QuantizeLinear outputs now uint8
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]:
        zero = initializers.get(q.input[2])
        dequantizers = readers.get(q.output[0], [])
        if zero is None or zero.data_type != onnx.TensorProto.INT8 or q.output[0] in outputs or not all(
                d.op_type == "DequantizeLinear" and len(d.input) > 2 and d.input[2] == zero.name for d in dequantizers):
            continue  # only pairs whose every reader can follow (a graph output keeps its declared type)
        converted.add(q.output[0])
        if zero.name not in moved:
            moved[zero.name] = f"{zero.name}_u8"
            shifted = (numpy_helper.to_array(zero).astype(np.int16) + 128).astype(np.uint8)
            graph.initializer.append(numpy_helper.from_array(shifted, moved[zero.name]))
        for node in (q, *dequantizers):
            node.input[2] = moved[zero.name]
    if not moved:
        return None
    still_read = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name not in moved or i.name in still_read]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    declared = [v for v in graph.value_info if v.name not in converted]  # int8 declarations would now be wrong
    graph.ClearField("value_info")
    graph.value_info.extend(declared)
    copy = source.with_name(f".{source.stem}.u8.{os.getpid()}.onnx")
    try:
        onnx.save_model(model, str(copy))
    except BaseException:
        copy.unlink(missing_ok=True)
        raise
    return copy


def build_component(source: Path, out: Path, component: str, precision: P, shapes: dict, target: Mapping,
                    versions: Mapping, compiled_cache: bool = True) -> BuildResult:
    """Optimise `source` for this CPU into `out` (written under a temporary name, then renamed).

    ORT sessions take any shape in the spec's ranges, so `shapes` only goes into the manifest."""
    import onnxruntime as ort

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    weights = out.with_name(out.name + ".data")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 3  # ORT warns that an ENABLE_ALL graph is hardware-specific: the manifest says so
    # A source with external weights always gets its own weights file: otherwise ORT's saved graph keeps
    # pointing into the source's .data file (a temporary one, for int8 Q/DQ graphs).
    # A 16-bit source can double: the CPU provider computes fp16 in fp32 and its optimiser folds the weights'
    # Casts into fp32 copies (measured: the real fp16 transformer, 1.19 GB, optimised to 2.37 GB > protobuf's 2 GB).
    growth = 2 if precision in (P.FP16, P.BF16) else 1
    external = (source.with_name(source.name + ".data").exists()
                or source.stat().st_size * growth > EXTERNAL_DATA_BYTES)
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights.name)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    converted = u8_activations(source) if precision == P.INT8 else None
    try:
        # External weights go straight to their final name (the model file refers to it by that
        # name); the model file itself appears only by the rename, so it is never seen half-written.
        ort.InferenceSession(str(converted or source), opts, providers=[PROVIDER])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        if converted is not None:
            converted.unlink(missing_ok=True)
        if not out.exists():  # failed (e.g. disk full): drop the half-written weights file too
            weights.unlink(missing_ok=True)
    return BuildResult(
        info={"execution_provider": PROVIDER,
              "graph_optimization": "ORT_ENABLE_ALL (saved); loaded with optimisation off"},
        extra_files=(weights,) if weights.exists() else ())
