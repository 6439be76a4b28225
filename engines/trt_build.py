"""TensorRT engines, built with Polygraphy's loaders.

The build is a composition of Polygraphy loaders (network from the ONNX path → builder config with
the profile, optimisation level, workspace and a timing cache → serialized engine bytes), so TensorRT is
imported only when the composition runs. The same composition builds TensorRT-RTX engines
(engines/rtx_build.py), which is how the suite runs it for real on a CPU machine: TensorRT-RTX's builder
has TensorRT's API and needs no GPU (tests/engines/test_tensorrt_cpu.py, with POLYGRAPHY_USE_TENSORRT_RTX=1).

Precision lives in the graph: every network is strongly typed (TensorRT 11 removed weak typing; 10
builds strongly typed networks too). fp32 and tf32 engines build from the fp32 export (tf32 is a
math mode of fp32 layers), bf16 and fp16 engines from the export's typed variant of that dtype
(export/typed.py: 16-bit weights and activations, fp32 islands where the model needs them, fp32
I/O), int8/fp8 from a calibrated Q/DQ graph put into the bf16 (fp16 before Ampere) variant
(engines/quantize.py, engines/typed_qdq.py; explicit quantization, the rest in 16 bit). No precision
flags, no layer pins.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Mapping


from sprintrt import machine
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import tensorrt_profile
from sprintrt.engines.registry import BuildResult, refuse_target_request
from sprintrt.errors import EngineBuildError, InvalidInputError, MissingDependencyError, ModelLoadError
from sprintrt.specs import CONTROLLED_TRANSFORMER, CONTROLNET, COMPONENTS, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER

NAME = "tensorrt"
LIBRARY = "tensorrt"
SUFFIX = ".plan"
DEVICE = "gpu"
P = Precision
# int8 / fp8: explicit Q/DQ quantization, strongly typed (fp8 needs compute capability >= 8.9)
ALLOWED = {TEXT_ENCODER: (P.FP32, P.TF32, P.BF16, P.INT8),
           TRANSFORMER: (P.FP32, P.TF32, P.BF16, P.FP16, P.INT8, P.FP8),
           VAE_DECODER: (P.FP32, P.TF32, P.BF16, P.FP16, P.INT8),
           VAE_ENCODER: (P.FP32, P.TF32, P.BF16, P.FP16, P.INT8),
           CONTROLNET: (P.FP32, P.TF32, P.BF16, P.FP16, P.INT8, P.FP8),
           CONTROLLED_TRANSFORMER: (P.FP32, P.TF32, P.BF16, P.FP16, P.INT8, P.FP8)}
WORKSPACE_BYTES = 8 << 30
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default; 5 searches longer for a few % more
INSTALL = ("Fix: run the TensorRT build on a machine with an NVIDIA GPU and driver, with TensorRT installed "
           "(pip install tensorrt-cu12, or the NVIDIA container); `sprintrt doctor` shows what this machine has. "
           "On a CPU machine use --backend onnxruntime or openvino")


def build_target(requested: str | None = None) -> dict:
    """The GPU engines are built for (device 0 or $CUDA_VISIBLE_DEVICES' first). Raises if there is none."""
    refuse_target_request(NAME, requested)
    try:
        return machine.gpu_target()
    except MissingDependencyError as e:
        raise MissingDependencyError(f"{e}. {INSTALL}") from None


def library_versions() -> dict:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the pip stub that raises on import where no real TensorRT installs
        raise MissingDependencyError(f"TensorRT is not installed ({e}). {INSTALL}") from e
    return {LIBRARY: trt.__version__}


def auto_preference() -> int:
    """Wins wherever an NVIDIA GPU and TensorRT are both present."""
    return 3 if machine.gpus() and machine.library_version(LIBRARY) else 0


def capabilities(target: Mapping) -> str:
    cc = _compute_capability(target)
    precisions = ["fp32", "tf32", "fp16", "int8"]
    precisions += ["bf16"] if cc >= BF16_MIN_COMPUTE_CAPABILITY else []
    precisions += ["fp8"] if cc >= FP8_MIN_COMPUTE_CAPABILITY else []
    return (f"{', '.join(precisions)} ({target['name']}; strongly typed networks: bf16/fp16 from the export's typed "
            "variants, int8/fp8 from Q/DQ graphs)")


# Precisions built from the export's typed (16-bit) variant rather than the fp32 graph.
TYPED_PRECISIONS = frozenset({Precision.BF16, Precision.FP16})
VARIANT_OPTIONAL: frozenset = frozenset()  # strongly typed: the precision must be in the graph
PRECISION_LIBRARIES: dict = {}
KEY_REVISIONS: dict = {}
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
    check_lint(component, export_record)
    check_precision(precision, target)


def check_lint(component: str, export_record: Mapping) -> None:
    """Refuse a graph the export's op-table lint found TensorRT would reject (TensorRT-RTX shares this)."""
    findings = export_record.get("trt_lint", [])
    if findings:
        raise ModelLoadError(f"{export_record.get('file', component + '.onnx')} is not ready for TensorRT: "
                             f"{findings[0]}{f' (and {len(findings) - 1} more)' if len(findings) > 1 else ''}. "
                             "Fix: re-export with this sprintrt version, whose graph passes remove these ops")


def _compute_capability(gpu: Mapping) -> tuple[int, int]:
    return machine.compute_capability(gpu.get("compute_capability", "0.0"))


def check_precision(precision: Precision, gpu: Mapping) -> None:
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


# ---- the Polygraphy composition (TensorRT-RTX builds with it too: engines/rtx_build.py) -----------------

def network_loader(source: Path):
    """The strongly typed network of `source` (which carries the precision: fp32 graph, typed variant or Q/DQ
    graph), as a Polygraphy loader: calling it parses."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    return NetworkFromOnnxPath(str(source), strongly_typed=True)


def config_loader(precision: Precision, shapes: dict, timing_cache: Path | None, create_config=None,
                  workspace_bytes: int | None = WORKSPACE_BYTES):
    """The builder config as a Polygraphy loader: the shape profile, the optimisation level, the workspace limit
    and a timing cache; only tf32 sets a flag (a math mode of fp32 layers). `create_config` is Polygraphy's
    config loader class (CreateConfig; TensorRT-RTX passes its own, which sets the target GPUs). `workspace_bytes`
    None leaves the workspace to the library (its default: the GPU's memory)."""
    from polygraphy.backend.trt import CreateConfig, PostprocessConfig, Profile

    trt_profile = Profile()
    for name, s in shapes.items():
        trt_profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
    flags = {"tf32": True} if precision == Precision.TF32 else {}  # TensorRT-RTX's config takes no precision flag
    config = (create_config or CreateConfig)(
        profiles=[trt_profile],
        builder_optimization_level=BUILDER_OPTIMIZATION_LEVEL,
        load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None,
        **flags,
    )
    if workspace_bytes is None:
        return config
    return PostprocessConfig(config, func=functools.partial(_limit_workspace, workspace_bytes=workspace_bytes))


def build_loaders(source: Path, out: Path, precision: Precision, shapes: dict, timing_cache: Path | None,
                  create_config=None, workspace_bytes: int | None = WORKSPACE_BYTES):
    """The loader chain that builds one engine and writes its serialized bytes to `out`; calling the returned
    loader runs the build. Bytes only: building needs no GPU driver (deserialising would), so a build machine
    without a GPU (TensorRT-RTX's) runs it too. Constructed without importing TensorRT: the loaders import it
    when they run."""
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import EngineBytesFromNetwork

    engine = EngineBytesFromNetwork(network_loader(source),
                                    config=config_loader(precision, shapes, timing_cache, create_config,
                                                         workspace_bytes),
                                    save_timing_cache=str(timing_cache) if timing_cache else None)
    return SaveBytes(engine, path=str(out))


def _limit_workspace(builder, network, config, workspace_bytes: int):
    # The TensorRT module that made this config: tensorrt, or tensorrt_rtx when TensorRT-RTX builds.
    trt = sys.modules[type(config).__module__.partition(".")[0]]
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)


def build_serialized(source: Path, out: Path, precision: Precision, shapes: dict, timing_cache: Path | None,
                     create_config=None, workspace_bytes: int | None = WORKSPACE_BYTES) -> dict:
    """Run the loader chain into `out` (written under a temporary name, then renamed); a graph the builder
    refuses is an EngineBuildError naming what its parser said. Returns the manifest fields of the build."""
    from polygraphy.exception import PolygraphyException

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        build_loaders(source, tmp, precision, shapes, timing_cache, create_config, workspace_bytes)()
        os.replace(tmp, out)
    except PolygraphyException as e:
        from sprintrt.trt_parser import parse_problems

        problems = parse_problems(source) or []
        if problems:
            raise EngineBuildError(f"TensorRT could not build {source.name} (its parser: {problems[0]}). Fix: "
                                   "re-export with this sprintrt version; if it persists, report it with the ONNX "
                                   "file") from None
        # The graph parses: the builder refused (its [E] line above says why, e.g. OutOfMemory for a profile).
        raise EngineBuildError(f"TensorRT parsed {source.name} but could not build it "
                               f"({str(e).strip().splitlines()[-1]}; the builder's [E] line above says why). Fix: if "
                               "it is OutOfMemory, build a smaller profile (--max-batch or --static); else report it "
                               "with the ONNX file") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"builder_optimization_level": BUILDER_OPTIMIZATION_LEVEL,
            **({"timing_cache": str(timing_cache)} if timing_cache else {})}


def build_component(source: Path, out: Path, component: str, precision: Precision, shapes: dict, target: Mapping,
                    versions: Mapping, compiled_cache: bool = True) -> BuildResult:
    """Build one engine into `out` (written under a temporary name, then renamed).

    `shapes` maps each input to its min/opt/max shapes (engines.profiles.input_shapes)."""
    cache = timing_cache_path(target, versions[LIBRARY])
    cache.parent.mkdir(parents=True, exist_ok=True)
    info = build_serialized(source, out, precision, shapes, cache)
    return BuildResult(info={"execution_provider": "TensorRT", "strongly_typed": True, **info})
