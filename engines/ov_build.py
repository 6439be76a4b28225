"""OpenVINO "engines" for CPUs: the ONNX converted to OpenVINO IR, compiled for this CPU and cached.

OpenVINO's CPU plugin runs bf16 kernels (AVX512-BF16 / AMX) when its inference-precision hint says
bf16, which ONNX Runtime's CPU provider does not: measured on the real DC-AE decoder at 512², bf16
took 6.1 s against 12.0 s for ONNX Runtime fp32 (AVX512-BF16/AMX Xeon). The IR (.xml + .bin) is
portable; the compiled blob in `ov_cache/` is specific to the CPU's ISA and the OpenVINO version,
which the manifest records and the loader checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from sprintrt import machine
from sprintrt.engines.precision import Precision, components_in
from sprintrt.engines.profiles import full_profile
from sprintrt.engines.registry import BuildResult, refuse_target_request
from sprintrt.errors import MissingDependencyError
from sprintrt.specs import CONTROLLED_TRANSFORMER, CONTROLNET, COMPONENTS, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER

NAME = "openvino"
LIBRARY = "openvino"
SUFFIX = ".xml"
DEVICE = "cpu"
CACHE = "ov_cache"  # the compiled blobs, beside the IRs (the manifest entry names it as "cache_dir")
P = Precision
# bf16: a run-time hint (from the bf16 variant where exported); int8: OpenVINO runs the same Q/DQ graphs as ONNX
# Runtime with its int8 kernels; int8w: weight compression of the matmul layers (the decoder is convolutions).
ALLOWED = {TEXT_ENCODER: (P.FP32, P.BF16, P.INT8, P.INT8W), TRANSFORMER: (P.FP32, P.BF16, P.INT8, P.INT8W),
           VAE_DECODER: (P.FP32, P.BF16, P.INT8), VAE_ENCODER: (P.FP32, P.BF16, P.INT8),
           CONTROLNET: (P.FP32, P.BF16, P.INT8, P.INT8W), CONTROLLED_TRANSFORMER: (P.FP32, P.BF16, P.INT8, P.INT8W)}
HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16"}
# int8: the Q/DQ graph's quantized layers run OpenVINO's int8 kernels, the others in bf16 where the CPU has it
# (else fp32). Measured on the real 0.6B DC-AE decoder at 512² (random weights, 2-vCPU AMX Xeon), the same
# mixed Q/DQ graph (42% of the multiply-adds in int8): 4.50 s with its float layers in fp32, 1.32 s in bf16,
# against 1.44 s for the bf16 engine (cosine to fp32 0.99951, 44.0 dB; fp32 parts 0.99960, 44.9 dB).
FLOAT_PARTS_IN_BF16 = frozenset({Precision.INT8, Precision.INT8W})
# What else decides an engine of a precision, in its key (engines/build.py): v2, int8's float layers in bf16.
KEY_REVISIONS = {Precision.INT8: "ovfloat2"}
# int8w: int8 weights (per channel, asymmetric: optimum-intel's default int8 weight format), decompressed in
# the matmul kernels, which compute in bf16 where the CPU has it (from the bf16 variant), else in fp32. Whether
# it wins is measured per component (the tuner's candidate): on the real 0.6B architecture (Zen 5 EPYC, random
# weights) Gemma2 took 0.90-1.07 s vs 1.20 s bf16 (weights 2.0 vs 4.1 GB; cosine to fp32 0.9989, just under the
# 0.999 gate), while the transformer took 2.97 s vs 0.62 s bf16 (cosine 0.99991).
WEIGHT_COMPRESSION = "INT8_ASYM"
PRECISION_LIBRARIES = {Precision.INT8W: ("nncf",)}
# bf16 is OpenVINO's run-time precision hint, so the fp32 graph would do; the export's bf16 variant is used
# when it has one because its weights are already bf16: measured on the real 0.6B architecture at 512² (Zen 5
# EPYC, AVX512-BF16): 5.1 s per image vs 5.8 s from the fp32 graph, peak RSS 11.2 vs 16.5 GB, build 43 vs 91 s.
TYPED_PRECISIONS = frozenset({Precision.BF16})
VARIANT_OPTIONAL = frozenset({Precision.BF16, Precision.INT8W})


def openvino():
    """The openvino module, or a typed error saying how to get it."""
    try:
        import openvino as ov
    except ImportError as e:
        raise MissingDependencyError(f"the openvino backend needs the 'openvino' package ({e}). Fix: pip install "
                                     "openvino, or use --backend onnxruntime") from e
    return ov


def build_target(requested: str | None = None) -> dict:
    refuse_target_request(NAME, requested)
    return machine.cpu_target()


def nncf():
    """The nncf module (OpenVINO's compression library), or a typed error saying how to get it."""
    try:
        import nncf as module
    except ImportError as e:
        raise MissingDependencyError(f"int8w engines need the 'nncf' package ({e}). Fix: pip install nncf, or "
                                     "build another precision") from e
    return module


def library_versions() -> dict:
    return {LIBRARY: openvino().__version__}  # NNCF only writes int8w IRs: in their keys, not needed to run them


def auto_preference() -> int:
    """Beats ONNX Runtime on CPUs with bf16 instructions (its bf16 kernels; ORT's CPU provider has none)."""
    return 2 if machine.library_version(LIBRARY) and machine.cpu_has_bf16() else 0


def capabilities(target: Mapping) -> str:
    bf16 = ("bf16 (this CPU has bf16 instructions; the default)" if machine.cpu_has_bf16(dict(target))
            else "bf16 emulated, slow (no AVX512-BF16/AMX here; fp32 is the default)")
    int8w = (f"int8w (int8 weights, NNCF: {components_in(ALLOWED, P.INT8W)})" if machine.library_version("nncf")
             else "int8w needs nncf (pip install nncf)")
    return f"fp32, {bf16}, int8 (the same Q/DQ graphs), {int8w} (CPU)"


def hint(precision: Precision, target: Mapping | None = None) -> str:
    """OpenVINO's inference-precision hint for an engine of `precision` built for `target` (None: this CPU)."""
    if precision in FLOAT_PARTS_IN_BF16:
        return "bf16" if machine.cpu_has_bf16(dict(target) if target else None) else "f32"
    return HINTS[precision]


def default_precisions(versions: Mapping | None = None, target: Mapping | None = None) -> dict:
    """bf16 where the CPU has bf16 instructions; elsewhere OpenVINO would emulate it slowly: fp32."""
    p = Precision.BF16 if machine.cpu_has_bf16(dict(target) if target else None) else Precision.FP32
    return {c: p for c in COMPONENTS}


def quantized_base(component: str, target: Mapping, precision: Precision):
    """int8: None (OpenVINO reads the fp32 Q/DQ graph; its precision hint decides the rest). int8w: the bf16
    variant's weights are compressed where the CPU computes in bf16 (half the bytes to read and convert)."""
    if precision == Precision.INT8W and machine.cpu_has_bf16(dict(target)):
        return Precision.BF16
    return None


def check_buildable(component: str, precision: Precision, export_record: Mapping, versions: Mapping,
                    target: Mapping) -> None:
    """int8w needs NNCF; everything else OpenVINO cannot build is already refused by the precision table."""
    if precision == Precision.INT8W:
        nncf()


def profile(spec, model, options) -> dict:
    return full_profile(spec)  # the IR keeps the ONNX's dynamic dims


def compile_config(precision: Precision, target: Mapping | None = None) -> dict:
    """How the engine is compiled, at build time (to fill the blob cache) and at run time (the manifest
    records it, so the run side finds the cached blob instead of compiling again)."""
    return {"INFERENCE_PRECISION_HINT": hint(precision, target), "PERFORMANCE_HINT": "LATENCY"}


def build_component(source: Path, out: Path, component: str, precision: Precision, shapes: dict, target: Mapping,
                    versions: Mapping, compiled_cache: bool = True) -> BuildResult:
    """Convert `source` to IR at `out` (+ .bin) and compile it once to fill the blob cache (unless not
    `compiled_cache`: the tuner's candidates, whose blobs would be written only to be deleted)."""
    ov = openvino()
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.xml")
    try:
        if precision == Precision.INT8W:
            # convert_model folds the weights' Transposes into constants, which NNCF needs to find the matmuls'
            # weights (read_model leaves Constant -> Transpose -> MatMul and nothing would be compressed).
            model = nncf().compress_weights(ov.convert_model(str(source)),
                                            mode=getattr(nncf().CompressWeightsMode, WEIGHT_COMPRESSION))
        else:
            model = ov.Core().read_model(str(source))
        ov.save_model(model, str(tmp), compress_to_fp16=False)  # keep the source's weight type (fp32, or bf16)
        # Compiling reads the IR again: the converted model held on through it costs its weights once more
        # (measured, real 8 GB fp32 Gemma2, AMX Xeon: peak RSS 18.4 GB kept, 13.2 GB dropped first).
        del model
        os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    config = compile_config(precision, target)
    if compiled_cache:
        # The whole compiled graph: OpenVINO's weightless blob (CACHE_MODE OPTIMIZE_SIZE, the weights read from
        # the .bin) was tried, 0.00 instead of 7.55 GB for the real Gemma2, but the tiny Gemma2's present_key_values
        # came back from it one position short (OpenVINO 2026.4): a different graph. OpenVINO keys the blob by the
        # IR's path, so an engine moved elsewhere is compiled again where it is loaded (the tuner compiles its choice
        # where it moves it).
        ov.Core().compile_model(str(out), "CPU", dict(config, CACHE_DIR=str(out.parent / CACHE)))
    info = {"execution_provider": "OpenVINO CPU", "inference_precision": hint(precision, target),
            "compile_config": config, "cache_dir": CACHE}
    if precision == Precision.INT8W:
        info["weight_compression"] = f"nncf {nncf().__version__}: {WEIGHT_COMPRESSION.lower()} per channel"
    return BuildResult(info=info,
                       extra_files=(out.with_suffix(".bin"),))
