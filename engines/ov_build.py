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
from sprintrt.engines.backend import BuildResult
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import full_profile
from sprintrt.errors import MissingDependencyError
from sprintrt.export.specs import COMPONENTS

NAME = "openvino"
LIBRARY = "openvino"
SUFFIX = ".xml"
CACHE = "ov_cache"
# int8: the Q/DQ graph's quantized layers run OpenVINO's int8 kernels; the rest keeps fp32.
HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.INT8: "f32"}
# bf16 is OpenVINO's run-time precision hint, so the fp32 graph would do; the export's bf16 variant is used
# when it has one because its weights are already bf16: measured on the real 0.6B architecture at 512² (Zen 5
# EPYC, AVX512-BF16): 5.1 s per image vs 5.8 s from the fp32 graph, peak RSS 11.2 vs 16.5 GB, build 43 vs 91 s.
TYPED_PRECISIONS = frozenset({Precision.BF16})
VARIANT_OPTIONAL = frozenset({Precision.BF16})


def openvino():
    """The openvino module, or a typed error saying how to get it."""
    try:
        import openvino as ov
    except ImportError as e:
        raise MissingDependencyError(f"the openvino backend needs the 'openvino' package ({e}). Fix: pip install "
                                     "openvino, or use --backend onnxruntime") from e
    return ov


def target() -> dict:
    return machine.cpu_target()


def versions() -> dict:
    return {LIBRARY: openvino().__version__}


def default_precisions(versions: Mapping | None = None, target: Mapping | None = None) -> dict:
    """bf16 where the CPU has bf16 instructions; elsewhere OpenVINO would emulate it slowly: fp32."""
    p = Precision.BF16 if machine.cpu_has_bf16(dict(target) if target else None) else Precision.FP32
    return {c: p for c in COMPONENTS}


def quantized_base(component: str, target: Mapping):
    """None: OpenVINO reads the fp32 Q/DQ graph; its precision hint decides the rest."""
    return None


def check_buildable(component: str, precision: Precision, export_record: Mapping, versions: Mapping,
                    target: Mapping) -> None:
    """Everything OpenVINO cannot build is already refused by the precision table."""


def profile(spec, model, options) -> dict:
    return full_profile(spec)  # the IR keeps the ONNX's dynamic dims


def compile_config(precision: Precision, cache_dir: Path, threads: int | None = None) -> dict:
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(cache_dir)}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def build_component(source: Path, out: Path, component: str, precision: Precision, shapes: dict,
                    target_info: Mapping, library_versions: Mapping) -> BuildResult:
    """Convert `source` to IR at `out` (+ .bin) and compile it once to fill the blob cache."""
    ov = openvino()
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.xml")
    try:
        model = ov.Core().read_model(str(source))
        ov.save_model(model, str(tmp), compress_to_fp16=False)  # keep the source's weight type (fp32, or bf16)
        os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    ov.Core().compile_model(str(out), "CPU", compile_config(precision, out.parent / CACHE))
    return BuildResult(info={"execution_provider": "OpenVINO CPU", "inference_precision": HINTS[precision]},
                       extra_files=(out.with_suffix(".bin"),))
