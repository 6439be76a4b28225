"""TensorRT engines, built with Polygraphy's loaders.

The build is a composition of Polygraphy loaders (network from the ONNX path → builder config with
the profile, optimisation level, workspace and a timing cache → serialized engine), so TensorRT is
imported only when the composition runs; constructing it needs no TensorRT, which is how the CPU
tests check it.

Precision lives in the graph: every network is strongly typed (TensorRT 11 removed weak typing; 10
builds strongly typed networks too). fp32 and tf32 engines build from the fp32 export (tf32 is a
math mode of fp32 layers), bf16 and fp16 engines from the export's typed variant of that dtype
(export/typed.py: 16-bit weights and activations, fp32 islands where the model needs them, fp32
I/O), int8/fp8 from a calibrated Q/DQ graph put into the bf16 (fp16 before Ampere) variant
(engines/quantize.py, engines/typed_qdq.py; explicit quantization, the rest in 16 bit). No precision
flags, no layer pins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


from sprintrt import machine
from sprintrt.engines.backend import BuildResult
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import tensorrt_profile
from sprintrt.errors import InvalidInputError, MissingDependencyError, ModelLoadError
from sprintrt.export.specs import COMPONENTS, TEXT_ENCODER

NAME = "tensorrt"
LIBRARY = "tensorrt"
SUFFIX = ".plan"
WORKSPACE_BYTES = 8 << 30
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default; 5 searches longer for a few % more
INSTALL = ("Fix: run the TensorRT build on a machine with an NVIDIA GPU and driver, with TensorRT installed "
           "(pip install tensorrt-cu12, or the NVIDIA container); `sprintrt doctor` shows what this machine has. "
           "On a CPU machine use --backend onnxruntime or openvino")


def target() -> dict:
    """The GPU engines are built for (device 0 or $CUDA_VISIBLE_DEVICES' first). Raises if there is none."""
    gpus = machine.gpus()
    if not gpus:
        raise MissingDependencyError(f"no NVIDIA GPU is visible (nvidia-smi is missing or lists none). {INSTALL}")
    gpu = gpus[0]
    return {"kind": "gpu", "name": gpu["name"], "compute_capability": gpu["compute_capability"]}


def versions() -> dict:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError(f"TensorRT is not installed ({e}). {INSTALL}") from e
    return {LIBRARY: trt.__version__}


# Precisions built from the export's typed (16-bit) variant rather than the fp32 graph.
TYPED_PRECISIONS = frozenset({Precision.BF16, Precision.FP16})
VARIANT_OPTIONAL: frozenset = frozenset()  # strongly typed: the precision must be in the graph
PRECISION_LIBRARIES: dict = {}
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere and later
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper


def default_precisions(versions: Mapping | None = None, target: Mapping | None = None) -> dict:
    """bf16 for every component (Gemma2 must stay bf16; the transformer and DC-AE run it safely with their
    fp32 islands); fp16 on GPUs without bf16 (before Ampere), except Gemma2, which stays fp32 there."""
    if target and _compute_capability(target) < BF16_MIN_COMPUTE_CAPABILITY:
        return {c: Precision.FP32 if c == TEXT_ENCODER else Precision.FP16 for c in COMPONENTS}
    return {c: Precision.BF16 for c in COMPONENTS}


def quantized_base(component: str, target: Mapping, precision: Precision) -> Precision | None:
    """int8/fp8 Q/DQ pairs go into the component's default 16-bit variant (bf16; fp16 before Ampere), so
    the layers not quantized run in 16 bit as ModelOpt's recipes deploy them; Gemma2 where it would be
    fp16 (it overflows) keeps an fp32 base."""
    base = default_precisions(None, target)[component]
    return base if base in TYPED_PRECISIONS else None


def profile(spec, model, options) -> dict:
    return tensorrt_profile(spec, model, options)


def check_buildable(component: str, precision: Precision, export_record: Mapping, versions: Mapping,
                    target: Mapping) -> None:
    """Refuse, before any work, a graph TensorRT's operator table rejects, or a precision this GPU cannot
    build. `export_record` is the graph the engine is built from (the typed variant for bf16/fp16)."""
    findings = export_record.get("trt_lint", [])
    if findings:
        raise ModelLoadError(f"{export_record.get('file', component + '.onnx')} is not ready for TensorRT: "
                             f"{findings[0]}{f' (and {len(findings) - 1} more)' if len(findings) > 1 else ''}. "
                             "Fix: re-export with this sprintrt version, whose graph passes remove these ops")
    check_precision(precision, versions[LIBRARY], target)


def _compute_capability(gpu: Mapping) -> tuple[int, ...]:
    return tuple(int(x) for x in str(gpu.get("compute_capability", "0.0")).split(".")[:2])


def check_precision(precision: Precision, trt_version: str, gpu: Mapping) -> None:
    """Refuse a precision this GPU cannot run (every TensorRT version builds them strongly typed)."""
    cc = _compute_capability(gpu)
    if precision == Precision.BF16 and cc < BF16_MIN_COMPUTE_CAPABILITY:
        raise InvalidInputError(
            f"precision='bf16' needs a GPU of compute capability >= 8.0 (Ampere or later); {gpu.get('name')} has "
            f"{gpu.get('compute_capability')}. Fix: build --precision fp16 (text_encoder=fp32: Gemma2 overflows fp16)")
    if precision == Precision.FP8 and cc < FP8_MIN_COMPUTE_CAPABILITY:
        raise InvalidInputError(
            f"precision='fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper); {gpu.get('name')} has "
            f"{gpu.get('compute_capability')}. Fix: build --precision transformer=int8 on this GPU")


def timing_cache_path(gpu: Mapping, trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by every build on the machine.
    Polygraphy locks it while it merges a build's timings in."""
    root = Path(os.environ.get("SPRINTRT_CACHE_DIR", Path.home() / ".cache" / "sprintrt"))
    slug = "".join(ch if ch.isalnum() else "-" for ch in f"{gpu['name']}-sm{gpu['compute_capability']}-trt{trt_version}")
    return root / "timing" / f"{slug}.cache"


# ---- the Polygraphy composition ---------------------------------------------------------------------

def build_loaders(source: Path, out: Path, precision: Precision, shapes: dict, timing_cache: Path | None):
    """The loader chain that builds and saves one engine; calling the returned loader runs the build.

    Constructed without importing TensorRT: Polygraphy loaders import it when they run. `source` carries
    the precision (fp32 graph, typed variant or Q/DQ graph); only tf32 sets a flag (a math mode).
    """
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessConfig,
                                        Profile, SaveEngine)

    trt_profile = Profile()
    for name, s in shapes.items():
        trt_profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
    network = NetworkFromOnnxPath(str(source), strongly_typed=True)
    config = CreateConfig(
        tf32=precision == Precision.TF32,
        profiles=[trt_profile],
        builder_optimization_level=BUILDER_OPTIMIZATION_LEVEL,
        load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None,
    )
    config = PostprocessConfig(config, func=_limit_workspace)
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None)
    return SaveEngine(engine, path=str(out))


def _limit_workspace(builder, network, config):
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)


def build_component(source: Path, out: Path, component: str, precision: Precision, shapes: dict,
                    target_info: Mapping, library_versions: Mapping) -> BuildResult:
    """Build one engine into `out` (written under a temporary name, then renamed).

    `shapes` maps each input to its min/opt/max shapes (engines.profiles.input_shapes)."""
    cache = timing_cache_path(target_info, library_versions[LIBRARY])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        build_loaders(source, tmp, precision, shapes, cache)()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return BuildResult(info={"execution_provider": "TensorRT", "strongly_typed": True,
                             "builder_optimization_level": BUILDER_OPTIMIZATION_LEVEL, "timing_cache": str(cache)})
