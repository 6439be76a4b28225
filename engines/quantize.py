"""INT8 and FP8 Q/DQ ONNX from an fp32 export, with ONNX Runtime's static quantization and real calibration data.

What is quantized (QDQ format: QuantizeLinear/DequantizeLinear around each quantized op, which both
ONNX Runtime and TensorRT consume): the MatMul/Gemm/Conv layers whose second input is a weight; int8
with per-channel symmetric weights and per-tensor symmetric activations (min/max calibration), fp8
(E4M3, for TensorRT on Ada/Hopper) with per-tensor scales (see _settings).

Which components have a recipe, and what stays in higher precision in each, is declared once in
KEEP_HIGH_PRECISION. Every activation-by-activation matmul stays in float everywhere (only layers
whose second input is a weight are quantized): the linear attention's v·kᵀ and ·q with its normaliser
division and epsilon, the cross-attention scores, Gemma2's attention scores and soft-capping, DC-AE's
linear attention. Layers are recognised by the PyTorch module path the exporter recorded.

The int8 recipe follows the target's int8 instructions. x86 CPUs without VNNI (e.g. AMD Zen 2/3,
Intel before Cascade Lake) run ONNX Runtime's int8 matmuls and convolutions with VPMADDUBSW, which
adds two u8 x s8 products into a *saturating* int16: 255 * 127 * 2 = 64770 overflows 32767. Measured
on the tiny transformer on an AMD EPYC (AVX2, no VNNI): the same Q/DQ graph gave cosine 0.99993 to
fp32 with the Q/DQ nodes run as fp32 ops and 0.99851 through ORT's fused int8 kernels; images lost
15-20 dB (35-39 dB against diffusers). With 7-bit weights (ONNX Runtime's `reduce_range`), 255 * 64 *
2 = 32640 cannot overflow: fused and unfused agree (0.99989). So on such CPUs the weights use 7 bits
("int8-w7" in the engine key); CPUs with VNNI / AMX-INT8 (which accumulate in int32), non-x86 CPUs
and GPUs keep the full 8 bits. The CPU's ISA is in the engine's target, so an engine quantized for one
CPU class is never loaded on the other.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Mapping

from sprintrt import machine
from sprintrt.engines import sensitivity
from sprintrt.engines.sensitivity import GROUPS
from sprintrt.errors import InvalidInputError
from sprintrt.specs import CONTROLLED_TRANSFORMER, CONTROLNET, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER

# As NVIDIA ModelOpt's diffusion recipes keep them: the time/guidance and patch embeddings (a timestep error
# shifts every token), the caption projection and norm (their input is the text encoder's unnormalised output),
# the final norm and projection (they write the velocity the scheduler integrates).
_TRANSFORMER_EMBEDDINGS = (".time_embed.", ".patch_embed.", ".caption_projection.", ".caption_norm")
_TRANSFORMER_EDGES = (*_TRANSFORMER_EMBEDDINGS, ".proj_out", ".norm_out")
# Per component with an int8/fp8 recipe: the weight layers kept in higher precision (module-path parts).
KEEP_HIGH_PRECISION = {
    TRANSFORMER: _TRANSFORMER_EDGES,
    # The same transformer with the ControlNet's residuals as one more input: the same layers, the same rule.
    CONTROLLED_TRANSFORMER: _TRANSFORMER_EDGES,
    # The ControlNet's own edges too: its embeddings as the transformer's, the input projection of the
    # control latent (added to every token) and the per-block output projections (they write the residuals
    # the transformer adds to its stream, as proj_out writes the velocity): 15 of a 7-block ControlNet's 92.
    CONTROLNET: (*_TRANSFORMER_EMBEDDINGS, ".input_block.", ".controlnet_blocks."),
    # The decoder's first and last convolutions (not the blocks' own conv_out): conv_in reads the latent
    # (32 channels, every value matters) and conv_out writes the pixels; 2 of the real decoder's 106 weight layers.
    VAE_DECODER: (".decoder.conv_in.", ".decoder.conv_out."),
    # The encoder's alike: conv_in reads the pixels, conv_out writes the latent.
    VAE_ENCODER: (".encoder.conv_in.", ".encoder.conv_out."),
    # Gemma2: every projection of every layer is quantized (per-channel weights); the embedding is a
    # Gather (never quantized) and the final RMSNorm has no matmul.
    TEXT_ENCODER: (),
}
QUANTIZABLE = tuple(KEEP_HIGH_PRECISION)
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
# Calibration keeps at most this many samples' intermediate outputs in memory before folding them
# into running min/max ranges: ORT's default keeps all of them. Measured on the real 0.6B architecture
# at 512²: 4 decoder samples at once exceeded 24 GB (killed), one sample is about 6 GB.
CALIBRATION_CHUNK = {TRANSFORMER: 4, TEXT_ENCODER: 4, VAE_DECODER: 1, VAE_ENCODER: 1, CONTROLNET: 4,
                     CONTROLLED_TRANSFORMER: 4}


def _stride(n: int, component: str) -> int:
    """The largest divisor of n up to the component's chunk (ORT needs the strides to tile the data)."""
    return max(d for d in range(1, min(n, CALIBRATION_CHUNK[component]) + 1) if n % d == 0)


def quantizable_nodes(model, component: str) -> tuple[list[str], list[str]]:
    """(nodes to quantize, weight-bearing nodes kept in higher precision) of a component's exported graph;
    KEEP_HIGH_PRECISION names the module paths each component keeps."""
    import onnx

    if component not in KEEP_HIGH_PRECISION:
        raise InvalidInputError(f"component={component!r} has no int8/fp8 recipe: expected one of "
                                f"{list(KEEP_HIGH_PRECISION)}. Fix: keep it in a float precision")
    kept_scopes = KEEP_HIGH_PRECISION[component]

    from sprintrt.onnx_scopes import module_scopes

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    scopes = module_scopes(model)
    quantize, keep = [], []
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS or len(n.input) < 2 or n.input[1] not in weights:
            continue
        scope = scopes.get(n.output[0])
        if scope is None:
            raise InvalidInputError(f"node '{n.name}' carries no module path, so sprintrt cannot tell which layers "
                                    "must stay in higher precision. Fix: re-export with this sprintrt version")
        (keep if any(k in scope + "." for k in kept_scopes) else quantize).append(n.name)
    if not quantize:  # ONNX Runtime reads an empty nodes_to_quantize as "every node": never hand it one
        raise InvalidInputError(f"the {component} graph has no {'/'.join(QUANTIZED_OPS)} layer reading a weight "
                                "directly, so the int8/fp8 recipe would quantize nothing (exports over 2 GB by "
                                "sprintrt before its weight-Transpose folding hid every linear layer). Fix: "
                                "re-export with this sprintrt version")
    return quantize, keep


def int8_saturates(target: Mapping | None) -> bool:
    """Whether the target's int8 kernels add u8 x s8 pairs in a saturating int16 (x86 CPUs without VNNI /
    AMX-INT8). None means this machine's CPU."""
    target = target or machine.cpu_target()
    return target.get("kind") == "cpu" and not machine.cpu_has_int8_dot(dict(target))


def for_tensorrt(target: Mapping | None) -> bool:
    """Whether the Q/DQ graph is for a GPU (TensorRT, TensorRT-RTX), whose parser takes only int8/fp8 into a
    DequantizeLinear: a bias stays float there (ONNX Runtime's int32 bias DequantizeLinear is refused,
    measured with TensorRT-RTX's parser)."""
    return target is not None and target.get("kind") != "cpu"


def measured(precision: str, component: str | None, uniform: bool = False) -> bool:
    """Whether `component`'s int8 layers are chosen by measured sensitivity (engines/sensitivity.py); never
    for a `uniform` graph (every quantizable layer outside KEEP_HIGH_PRECISION in int8: the tuner's speed probe)."""
    return precision == "int8" and component in GROUPS and not uniform


def recipe(precision: str, target: Mapping | None = None, component: str | None = None, uniform: bool = False) -> str:
    """The name of the Q/DQ recipe used for `precision` on `target` (for `component`): part of the engine key.
    "-mixed": the layers in int8 were chosen by measurement, the others stay in float."""
    name = precision
    if precision == "int8" and int8_saturates(target):
        name = "int8-w7"
    elif precision == "int8" and for_tensorrt(target):
        name = "int8-fbias"
    return name + ("-mixed" if measured(precision, component, uniform) else "")


# Op types whose output ONNX Runtime's quantizer must leave in float. It quantizes a quantized MatMul's output too
# when that tensor was calibrated, and then ONNX Runtime's CPU graph optimizer can fuse neither pattern: a Q after
# the MatMul rules out MatMulIntegerToFloat, and that Q feeding several float consumers (Gemma2's GELU: Mul, Add,
# Pow) kept its int8 zero point while the input's became uint8 (QDQS8ToU8), which rules out QLinearMatMul. Measured
# on the tiny text encoder's int8 engine, ORT 1.31.1, AMD EPYC Zen 3: none of its 14 weight MatMuls fused, so
# every call dequantized every weight and ran fp32 GEMMs (the real text encoder's int8 engine ran 10x slower than
# its fp32 one). With float MatMul outputs each becomes MatMulIntegerToFloat (u8s8). TensorRT quantizes inputs only.
UNQUANTIZED_OUTPUTS = ("MatMul", "Gemm")


def recipe_label(precision: str, target: Mapping | None, component: str, calibration: str,
                 uniform: bool = False) -> str:
    """The precision part of a quantized engine's key: the recipe, and a hash of what else decides the
    Q/DQ graph (the layers kept in higher precision, the outputs left in float, the calibration set), so no
    engine quantized by other rules or data is ever reused."""
    rules = repr((KEEP_HIGH_PRECISION[component], calibration) + ((UNQUANTIZED_OUTPUTS,) if precision == "int8" else ())
                 + ((sensitivity.rules(component),) if measured(precision, component, uniform) else ()))
    return recipe(precision, target, component, uniform) + "-" + hashlib.sha256(rules.encode()).hexdigest()[:8]


def _settings(precision: str, n_feeds: int, target: Mapping | None, component: str) -> dict:
    """quantize_static arguments per precision and target.

    int8: per-channel symmetric weights (7-bit where the target's kernels saturate, see the module
    docstring; float biases for TensorRT), per-tensor symmetric activations, min/max ranges folded in strides (bounded memory). fp8 (E4M3, TensorRT on Ada/Hopper): per-tensor scales for both, as
    TensorRT's FP8 recipe uses; ONNX Runtime calibrates float8 only with its "distribution" method,
    which keeps every sample's activations until the end: keep fp8 calibration sets small.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantType

    if precision == "int8":
        return dict(per_channel=True, reduce_range=int8_saturates(target),
                    activation_type=QuantType.QUInt8 if int8_saturates(target) else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "CalibStridedMinMax": _stride(n_feeds, component),
                                   "OpTypesToExcludeOutputQuantization": list(UNQUANTIZED_OUTPUTS),
                                   **({"QuantizeBias": False} if for_tensorrt(target) else {})})
    if precision == "fp8":
        return dict(per_channel=False, activation_type=QuantType.QFLOAT8E4M3FN, weight_type=QuantType.QFLOAT8E4M3FN,
                    calibrate_method=CalibrationMethod.Distribution, extra_options={"scenario": "same"})
    raise InvalidInputError(f"precision={precision!r} has no Q/DQ recipe: expected 'int8' or 'fp8'. Fix: pass one of them")


FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear take float8 from opset 19


def at_fp8_opset(source: Path) -> Path | None:
    """For fp8, `source` (its weights in a file beside it) converted to opset 19, written beside it and naming the
    same weights file, or None where it is already there. ONNX Runtime's quantizer would convert the graph itself,
    weights and all, with onnx's version converter, which serialises the whole model in memory: protobuf cannot
    past 2 GB (measured: the real 0.6B controlled transformer, opset 18, "Failed to serialize proto"). Converted
    here without its weights, the graph is a few MB; the converter is the same, so is the Q/DQ graph
    (tests/engines/test_ort_weights.py, tests/engines/test_int8.py). The caller removes the file."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source), load_external_data=False)
    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) >= FP8_OPSET:
        return None
    converted = source.with_name(f".{source.stem}.opset{FP8_OPSET}.{os.getpid()}.onnx")
    onnx.save_model(version_converter.convert_version(model, FP8_OPSET), str(converted))
    return converted


def quantize_qdq(source: Path, out: Path, feeds: list[dict], precision: str = "int8",
                 target: Mapping | None = None, *, component: str, uniform: bool = False,
                 say=lambda msg: None) -> dict:
    """Write the int8 or fp8 Q/DQ version of `component`'s graph `source` to `out` (temp name, then
    rename) for the engines' `target` (None: this machine's CPU). Returns what was done. `uniform`: every
    quantizable layer outside KEEP_HIGH_PRECISION in int8, no sensitivity measurement (see `measured`).

    Calibration and quantization are two passes so that one copy of the weights is in memory at a time:
    the ranges are computed first (calibrated_ranges) and handed to quantize_static through its
    calibration cache. In one quantize_static call the graph it quantizes stays loaded while its
    calibrator holds its own copy and runs a session of the augmented one (measured on 512 MB of
    weights: peak 3.2x the weights that way, 1.6x in two passes; tests/engines/test_calibration_memory.py)."""
    import inspect
    import tempfile

    from onnxruntime.quantization import QuantFormat, quantize_static

    from sprintrt.engines.calibrator import calibrated_ranges, quantizer_tensors
    from sprintrt.engines.ort_weights import vectorised_weights

    settings = _settings(precision, max(len(feeds), 1), target, component)  # an unknown precision fails before any work
    if not feeds:
        raise InvalidInputError("calibration produced no samples: expected at least one prompt. Fix: pass a "
                                "non-empty calibration prompt file")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise InvalidInputError(f"onnxruntime {onnxruntime.__version__} cannot quantize from precomputed ranges "
                                "(quantize_static has no calibration_cache_path). Fix: pip install 'onnxruntime>=1.31'")
    import onnx

    proto = onnx.load(str(source), load_external_data=False)
    quantize, keep = quantizable_nodes(proto, component)
    read = quantizer_tensors(proto, quantize)  # ranges for the layers any recipe may quantize, no others
    if measured(precision, component, uniform):
        from sprintrt.onnx_scopes import module_scopes

        by_output = module_scopes(proto)
        scopes = {n.name: by_output[n.output[0]] for n in proto.graph.node if n.output[0] in by_output}
    del proto  # a VAE's holds its weights
    # Over 2 GB (the real transformers) the calibration graph and the result need external weights.
    external = source.with_name(source.name + ".data").exists()
    if external and not os.access(source.parent, os.W_OK):
        # The calibrator's shape-inferred graph and fp8's opset-19 one name the weights file by a relative path,
        # so they are written beside it (ONNX Runtime and onnx refuse a weights path outside a graph's directory).
        raise InvalidInputError(f"{component}: quantizing {source.name} writes two small temporary graphs beside its "
                                f"weights file, and {source.parent} is not writable. Fix: make that directory "
                                "writable, or build from a writable copy of the export")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    converted = None  # fp8: the graph at opset 19, beside its weights
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a generic "consider pre-processing" warning on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="sprintrt-calibration-", dir=out.parent) as work, vectorised_weights():
            cache = Path(work) / "ranges.json"
            say(f"{precision} activation ranges of {component} on {len(feeds)} calibration sample(s)")
            given = source if external else external_weights_copy(source, Path(work))
            if precision == "fp8":
                converted = at_fp8_opset(given)
                given = converted or given
            reference = [] if measured(precision, component, uniform) else None  # the fp32 outputs, kept
            calibrated_ranges(given, feeds, settings, cache, only=read, outputs=reference)

            def write(nodes: list[str], path: Path) -> None:
                quantize_static(str(given), str(path), None, quant_format=QuantFormat.QDQ, nodes_to_quantize=nodes,
                                use_external_data_format=external, calibration_cache_path=str(cache), **settings)

            if measured(precision, component, uniform):
                chosen, measurement = sensitivity.choose_quantized(component, source, quantize, scopes, feeds, write,
                                                                   Path(work), UNQUANTIZED_OUTPUTS, say,
                                                                   reference=reference)
                keep = keep + [n for n in quantize if n not in set(chosen)]
                quantize = chosen
            say(f"writing the {precision} Q/DQ graph of {component} ({len(quantize)} quantized layers)")
            write(quantize, tmp)
        if external:  # the graph names its weights file; keep that name valid after the rename
            _move_external_data(tmp, out)
        os.replace(tmp, out)
    finally:
        root.setLevel(level)
        if converted is not None:
            converted.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    return {"quantized_nodes": len(quantize), "kept_high_precision": keep, "calibration_samples": len(feeds),
            "quantization_recipe": recipe(precision, target, component, uniform),
            **({"int8_sensitivity": measurement} if measured(precision, component, uniform) else {})}


def external_weights_copy(source: Path, work: Path) -> Path:
    """`source` (weights inside the graph) copied into `work` with its weights in a file beside it, for ONNX
    Runtime's calibrator and quantizer: each starts with onnx's infer_shapes_path on the file it is given,
    which took 11.5 s on the real DC-AE decoder's 690 MB graph with its weights inside and 0.01 s without
    (three such calls per quantized VAE, two per probe; 2-vCPU Intel Xeon with AMX). They load the weights
    back from that file, so the Q/DQ graph is the same (tests/engines/test_ort_weights.py)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(source))
    copy = work / source.name
    data = copy.with_name(copy.name + ".data")
    with open(data, "wb") as f:
        for init in model.graph.initializer:
            raw = init.raw_data
            if len(raw) < 1024:  # as onnx's own writer: small tensors stay in the graph
                continue
            set_external_data(init, data.name, f.tell(), len(raw))
            f.write(raw)
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(copy))
    return copy


def _move_external_data(tmp: Path, out: Path) -> None:
    """Point the graph at `<out>.data` and move the weights there (ORT wrote them beside `tmp`)."""
    import onnx

    model = onnx.load(str(tmp), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = out.name + ".data"
    src = next(tmp.parent.glob(tmp.name + "*.data"), None) or tmp.with_name(tmp.name + ".data")
    os.replace(src, out.with_name(out.name + ".data"))
    onnx.save_model(model, str(tmp))
