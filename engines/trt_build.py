"""TensorRT engines, built with Polygraphy's loaders.

The build is a composition of Polygraphy loaders (network from the ONNX path → builder config with
the profile, precision flags, optimisation level, workspace and a timing cache → serialized engine),
so TensorRT is imported only when the composition runs; constructing it needs no TensorRT, which is
how the CPU tests check it.

Precision: the exported ONNX is float32. Two kinds of network:
- Strongly typed (every layer runs in the type the ONNX gives it): fp32 and tf32 builds, and int8/fp8 builds
  from Q/DQ graphs (engines/quantize.py; explicit quantization: the quantized matmuls run in int8 /
  fp8, everything else in float32). TensorRT 11 removed weak typing, so on TensorRT >= 11 every
  build is strongly typed.
- Weakly typed (TensorRT 10 only): bf16 and fp16 set the builder's precision flag and pin the
  layers that must stay float32 — the linear attention's matmuls, normaliser division and epsilon in
  the transformer (docs/SANA_SPRINT_SPEC.md §9.2: the 1e-15 flushes to 0 and the sums pass 65504 in fp16;
  diffusers computes them in fp32 too), and the VAE's Resize — with `precision_constraints="obey"`. A pin that
  matches no TensorRT layer is an error, never a silent fp16 layer. On TensorRT 11 a bf16/fp16
  engine needs an ONNX that carries those types, which sprintrt does not export yet: refused with a
  typed error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from sprintrt import machine
from sprintrt.engines.backend import BuildResult
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import tensorrt_profile
from sprintrt.errors import InvalidInputError, MissingDependencyError, ModelLoadError
from sprintrt.export.specs import COMPONENTS

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


# Weak typing (precision builder flags) was removed in TensorRT 11.
WEAK_TYPING_LAST_MAJOR = 10
# TF32 is a math mode of float32 layers, not a type: TensorRT 11 keeps its flag for strongly typed networks.
WEAKLY_TYPED = (Precision.FP16, Precision.BF16)
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper


def strongly_typed(precision: Precision) -> bool:
    return precision not in WEAKLY_TYPED


def _has_weak_typing(trt_version: str) -> bool:
    return int(str(trt_version).split(".")[0]) <= WEAK_TYPING_LAST_MAJOR


def default_precisions(versions: Mapping | None = None, target: Mapping | None = None) -> dict:
    """bf16 for every component where weak typing exists (TensorRT 10, or a version not known yet);
    fp32 on TensorRT 11+, which cannot build bf16 from a float32 ONNX."""
    version = (versions or {}).get(LIBRARY)
    p = Precision.BF16 if version is None or _has_weak_typing(version) else Precision.FP32
    return {c: p for c in COMPONENTS}


def profile(spec, model, options) -> dict:
    return tensorrt_profile(spec, model, options)


def check_buildable(component: str, precision: Precision, export_record: Mapping, versions: Mapping,
                    target: Mapping) -> None:
    """Refuse, before any work, a graph TensorRT's operator table rejects, or a precision this TensorRT
    or this GPU cannot build."""
    findings = export_record.get("trt_lint", [])
    if findings:
        raise ModelLoadError(f"{component}.onnx is not ready for TensorRT: {findings[0]}"
                             f"{f' (and {len(findings) - 1} more)' if len(findings) > 1 else ''}. "
                             "Fix: re-export with this sprintrt version, whose graph passes remove these ops")
    check_precision(precision, versions[LIBRARY], target)


def check_precision(precision: Precision, trt_version: str, gpu: Mapping) -> None:
    """Refuse a precision this TensorRT version or this GPU cannot build."""
    if precision in WEAKLY_TYPED and not _has_weak_typing(trt_version):
        raise InvalidInputError(
            f"precision={precision.value!r} is not available with TensorRT {trt_version}: TensorRT 11 removed the "
            "weakly typed precision flags, and sprintrt exports float32 ONNX (typed bf16/fp16 export is not done yet). "
            "Fix: build --precision fp32, or transformer=int8 / fp8 (Q/DQ, strongly typed), or use TensorRT 10")
    if precision == Precision.FP8:
        cc = tuple(int(x) for x in str(gpu.get("compute_capability", "0.0")).split(".")[:2])
        if cc < FP8_MIN_COMPUTE_CAPABILITY:
            raise InvalidInputError(
                f"precision='fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper); {gpu.get('name')} has "
                f"{gpu.get('compute_capability')}. Fix: build --precision transformer=int8 on this GPU")


def timing_cache_path(gpu: Mapping, trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by every build on the machine.
    Polygraphy locks it while it merges a build's timings in."""
    root = Path(os.environ.get("SPRINTRT_CACHE_DIR", Path.home() / ".cache" / "sprintrt"))
    slug = "".join(ch if ch.isalnum() else "-" for ch in f"{gpu['name']}-sm{gpu['compute_capability']}-trt{trt_version}")
    return root / "timing" / f"{slug}.cache"


# ---- which layers stay float32 -----------------------------------------------------------------------

_LINEAR_ATTENTION_OPS = {"Slice", "Add", "Div", "MatMul", "Cast", "Transpose", "Reshape", "Unsqueeze", "Pad"}


def fp32_pinned_nodes(model, component: str) -> list[str]:
    """ONNX node names whose TensorRT layers must run in float32 for reduced-precision builds."""
    import onnx

    from sprintrt.export.graph_passes import constant_values

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    nodes = list(model.graph.node)
    if component == "vae_decoder":
        return [n.name for n in nodes if n.op_type == "Resize"]
    if component != "transformer":
        return []
    consts = constant_values(model)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pinned: list[str] = []
    for add in nodes:
        is_eps = add.op_type == "Add" and any(
            i in consts and consts[i].size == 1 and np.isclose(float(consts[i].ravel()[0]), 1e-15, rtol=1e-3, atol=0)
            for i in add.input)
        if not is_eps:
            continue
        # Walk back from the normaliser division through the two matmuls (v·kᵀ, then ·q).
        stack = [(n, 0) for n in consumers.get(add.output[0], []) if n.op_type == "Div"]
        seen = set()
        while stack:
            node, matmuls = stack.pop()
            if node.name in seen or node.op_type not in _LINEAR_ATTENTION_OPS:
                continue
            seen.add(node.name)
            pinned.append(node.name)
            matmuls += node.op_type == "MatMul"
            if matmuls >= 2:
                continue
            stack.extend((producer[i], matmuls) for i in node.input if i in producer)
    return pinned


# ---- the Polygraphy composition ---------------------------------------------------------------------

def build_loaders(source: Path, out: Path, precision: Precision, shapes: dict, pinned: list[str],
                  timing_cache: Path | None):
    """The loader chain that builds and saves one engine; calling the returned loader runs the build.

    Constructed without importing TensorRT: Polygraphy loaders import it when they run.
    """
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessConfig,
                                        PostprocessNetwork, Profile, SaveEngine)

    trt_profile = Profile()
    for name, s in shapes.items():
        trt_profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
    typed = strongly_typed(precision)
    network = NetworkFromOnnxPath(str(source), strongly_typed=typed or None)
    if pinned:
        network = PostprocessNetwork(network, func=lambda net: _pin_fp32(net, pinned), name="pin float32 layers")
    config = CreateConfig(
        tf32=precision == Precision.TF32,
        fp16=precision == Precision.FP16,
        bf16=precision == Precision.BF16,  # int8/fp8: no flags; the Q/DQ nodes carry the types
        profiles=[trt_profile],
        precision_constraints="obey" if pinned else None,
        builder_optimization_level=BUILDER_OPTIMIZATION_LEVEL,
        load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None,
    )
    config = PostprocessConfig(config, func=_limit_workspace)
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None)
    return SaveEngine(engine, path=str(out))


def _limit_workspace(builder, network, config):
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)


def _pin_fp32(network, pinned: list[str]):
    import tensorrt as trt

    wanted, hit = set(pinned), set()
    for layer in network:
        # The ONNX parser names a layer after its node, with a suffix when one node becomes several layers.
        base = next((p for p in wanted if layer.name == p or layer.name.startswith(p + "_")), None)
        if base is None:
            continue
        hit.add(base)
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            if layer.get_output(k).dtype in (trt.float16, trt.bfloat16, trt.float32):
                layer.set_output_type(k, trt.float32)
    missed = wanted - hit
    if missed:
        raise MissingDependencyError(f"{len(missed)} layers that must stay float32 were not found in the TensorRT "
                                     f"network (e.g. {sorted(missed)[:3]}); refusing to build a reduced-precision "
                                     "engine that could overflow. Fix: build with --precision fp32 and report this")
    return network


def build_component(source: Path, out: Path, component: str, precision: Precision, shapes: dict,
                    target_info: Mapping, library_versions: Mapping) -> BuildResult:
    """Build one engine into `out` (written under a temporary name, then renamed).

    `shapes` maps each input to its min/opt/max shapes (engines.profiles.input_shapes)."""
    pinned = fp32_pinned_nodes(source, component) if precision in WEAKLY_TYPED else []
    cache = timing_cache_path(target_info, library_versions[LIBRARY])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        build_loaders(source, tmp, precision, shapes, pinned, cache)()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return BuildResult(info={"execution_provider": "TensorRT", "fp32_pinned_layers": len(pinned),
                             "strongly_typed": strongly_typed(precision),
                             "builder_optimization_level": BUILDER_OPTIMIZATION_LEVEL, "timing_cache": str(cache)})
