"""TensorRT for RTX engines, built ahead of time on any machine (no GPU needed), for NVIDIA RTX GPUs.

TensorRT-RTX (`pip install tensorrt-rtx-cu13`, module `tensorrt_rtx`) is TensorRT for consumer RTX GPUs and
AI PCs: the same ONNX parser and builder API, a builder that runs on a CPU, and engines that are portable
across GPU generations and specialise ("JIT") for the user's GPU when first run (runtime/rtx_engine.py keeps
those results in a runtime cache beside the engines). Its networks are always strongly typed: precision
lives in the graph, and the engine is built by the TensorRT backend's own Polygraphy loader chain
(engines/trt_build.py) with TensorRT-RTX's config loader, which sets the target compute capabilities.

Targets: the compute capabilities the engines run on. By default TensorRT-RTX's own portable set (8.0, 8.6,
8.9, 12.0 and later: Ampere and newer, GeForce RTX 30xx to 50xx); `--compute-capability 8.9,12.0` names them
(7.5, Turing, only when named). What each target runs (NVIDIA's support matrix, checked with this builder):
fp32 and fp16 everywhere but fp32 GEMMs on 7.5, bf16 from 8.0, int8 as weight-only GEMMs everywhere, fp8
from 8.9. A precision a target cannot run is refused before any work, naming the target.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from sprintrt import machine
from sprintrt.engines import trt_build
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import tensorrt_profile
from sprintrt.engines.registry import BuildResult
from sprintrt.errors import EngineBuildError, InvalidInputError, MissingDependencyError
from sprintrt.specs import CONTROLLED_TRANSFORMER, CONTROLNET, COMPONENTS, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER

NAME = "tensorrt-rtx"
LIBRARY = "tensorrt_rtx"
SUFFIX = ".rtx.plan"
DEVICE = "gpu"
P = Precision
# int8w: int8 weights behind DequantizeLinear (per output channel), activations in the 16-bit base: the
# weight-only int8 GEMMs TensorRT-RTX runs; fp8: calibrated Q/DQ pairs on the 16-bit base (engines/quantize.py).
ALLOWED = {TEXT_ENCODER: (P.BF16, P.FP32, P.INT8W, P.FP8),
           TRANSFORMER: (P.BF16, P.FP32, P.FP16, P.INT8W, P.FP8),
           VAE_DECODER: (P.BF16, P.FP32, P.FP16, P.INT8W, P.FP8),
           VAE_ENCODER: (P.BF16, P.FP32, P.FP16, P.INT8W),
           CONTROLNET: (P.BF16, P.FP32, P.FP16, P.INT8W, P.FP8),
           CONTROLLED_TRANSFORMER: (P.BF16, P.FP32, P.FP16, P.INT8W, P.FP8)}
TYPED_PRECISIONS = frozenset({P.BF16, P.FP16})
VARIANT_OPTIONAL: frozenset = frozenset()  # strongly typed: the precision must be in the graph
PRECISION_LIBRARIES: dict = {}
KEY_REVISIONS: dict = {}
# TensorRT-RTX's portable default (its docs: "8.0, 8.6, 8.9, 12.0, and later"), what an engine built without
# named targets runs on.
DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
# The compute capabilities TensorRT-RTX 1.7 builds for when named (its ComputeCapability enum).
KNOWN_TARGETS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
# The lowest compute capability each precision runs on; "fp32 GEMM" has none on Turing.
MIN_COMPUTE_CAPABILITY = {P.BF16: (8, 0), P.FP8: (8, 9), P.FP32: (8, 0)}
INSTALL = "Fix: pip install tensorrt-rtx-cu13 (it builds on any machine, GPU or not)"


def tensorrt_rtx():
    """The tensorrt_rtx module, or a typed error saying how to get it."""
    try:
        import tensorrt_rtx as trt
    except Exception as e:  # ImportError, or a broken install
        raise MissingDependencyError(f"the tensorrt-rtx backend needs TensorRT for RTX ({e}). {INSTALL}") from e
    return trt


def parse_targets(requested: str | None) -> tuple[tuple[str, ...], bool]:
    """(compute capabilities, whether they are TensorRT-RTX's default) from "8.6,8.9,12.0" or None."""
    if requested is None:
        return DEFAULT_TARGETS, True
    items = [t.strip() for t in str(requested).split(",") if t.strip()]
    unknown = [t for t in items if t not in KNOWN_TARGETS]
    if unknown or not items:
        raise InvalidInputError(f"compute capability {requested!r} is not one TensorRT-RTX builds for: expected some of "
                                f"{list(KNOWN_TARGETS)}. Fix: e.g. --compute-capability 8.6,8.9,12.0 (RTX 30xx, 40xx, "
                                "50xx), or leave it out for TensorRT-RTX's portable default")
    return tuple(sorted(set(items), key=machine.compute_capability)), False


def targets_of(target: Mapping) -> list[str]:
    return str(target["compute_capability"]).split(",")


def build_target(requested: str | None = None) -> dict:
    """The GPUs the engines are built for: compute capabilities (`requested`, e.g. "8.6,8.9", or TensorRT-RTX's
    portable default), not this machine, which needs no GPU."""
    ccs, default = parse_targets(requested)
    return {"kind": "gpu", "name": "TensorRT-RTX " + ("portable default" if default else "targets"),
            "compute_capability": ",".join(ccs), "portable_default": default}


def library_versions() -> dict:
    return {LIBRARY: tensorrt_rtx().__version__}


def auto_preference() -> int:
    """`--backend auto` takes it on a machine with an RTX-class GPU (compute capability 8.6 or 8.9, 12.x) and
    TensorRT-RTX, where full TensorRT is not there to win (it ranks the same and is listed first)."""
    gpus = machine.gpus()
    if not gpus or machine.library_version(LIBRARY) is None:
        return 0
    return 3 if gpus[0]["compute_capability"] in ("8.6", "8.9", "12.0", "12.1") else 0


def runs_on(precision: Precision, compute_capability: str) -> bool:
    """Whether TensorRT-RTX runs `precision` on a GPU of this compute capability (MIN_COMPUTE_CAPABILITY)."""
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    return need is None or machine.compute_capability(compute_capability) >= need


def capabilities(target: Mapping) -> str:
    ccs = targets_of(target)
    names = []
    for p in (P.FP32, P.FP16, P.BF16, P.INT8W, P.FP8):
        not_on = [c for c in ccs if not runs_on(p, c)]
        names.append(f"{p.value} (not for {', '.join(not_on)})" if not_on else p.value)
    return (f"{', '.join(names)} for compute capabilities {', '.join(ccs)} (ahead of time, no GPU needed; "
            "--compute-capability names others)")


def default_precisions(versions: Mapping | None = None, target: Mapping | None = None) -> dict:
    """bf16 for every component, as on TensorRT; where Turing (7.5) is a target, fp16 (bf16 is not there), and
    Gemma2 stays bf16 (it overflows fp16 and Turing has no fp32 GEMMs: check_buildable says so)."""
    if target and not all(runs_on(P.BF16, c) for c in targets_of(target)):
        return {c: P.BF16 if c == TEXT_ENCODER else P.FP16 for c in COMPONENTS}
    return {c: P.BF16 for c in COMPONENTS}


def quantized_base(component: str, target: Mapping, precision: Precision) -> Precision:
    """int8w and fp8 layers sit in the component's default 16-bit variant: the rest runs in it."""
    return default_precisions(None, target)[component]


def check_buildable(component: str, precision: Precision, export_record: Mapping, versions: Mapping,
                    target: Mapping) -> None:
    """Refuse a graph the export found TensorRT would reject, or a precision one of the targets cannot run."""
    trt_build.check_lint(component, export_record)
    check_precision(precision, target)


def check_precision(precision: Precision, target: Mapping) -> None:
    low = [c for c in targets_of(target) if not runs_on(precision, c)]
    if low:
        need = ".".join(map(str, MIN_COMPUTE_CAPABILITY[precision]))
        fit = ",".join(c for c in targets_of(target) if runs_on(precision, c)) or "8.9,12.0"
        what = "fp32 GEMMs" if precision == P.FP32 else precision.value
        raise InvalidInputError(
            f"precision={precision.value!r} cannot run on compute capability {', '.join(low)}, one of the targets "
            f"({target['compute_capability']}): TensorRT-RTX runs {what} from {need} (fp16 and int8w everywhere, "
            f"bf16 from 8.0, fp8 from 8.9). Fix: --compute-capability {fit}, or another precision")


def profile(spec, model, options) -> dict:
    return tensorrt_profile(spec, model, options)


def build_component(source: Path, out: Path, component: str, precision: Precision, shapes: dict, target: Mapping,
                    versions: Mapping, compiled_cache: bool = True) -> BuildResult:
    """Build one engine into `out` with the TensorRT backend's loader chain and TensorRT-RTX's config loader
    (its target compute capabilities); serialized bytes only, so no GPU or driver is needed. int8w builds from
    the 16-bit variant with its weights made int8 (engines/weight_only.py), in a temporary graph."""
    tensorrt_rtx()
    _use_tensorrt_rtx_in_polygraphy()
    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

    # None: TensorRT-RTX's portable default; named targets are set on the builder config.
    ccs = None if target.get("portable_default") else [machine.compute_capability(c) for c in targets_of(target)]
    graph, extra = source, {}
    if precision == P.INT8W:
        from sprintrt.engines.weight_only import weight_only_int8

        graph = out.with_name(f".{out.name}.{os.getpid()}.int8w.onnx")
    try:
        if precision == P.INT8W:
            extra = weight_only_int8(source, graph, component)
        # No workspace limit: at the real 0.6B size the VAE decoder's largest profile (4 x 2048²) asks TensorRT-RTX
        # for 8.9 GB, which the full-TensorRT backend's 8 GiB limit refused ("OutOfMemory"); with no GPU to build
        # on, the limit is the target GPU's memory, known only where the engine runs.
        info = trt_build.build_serialized(graph, out, precision, shapes, None,
                                          create_config=lambda **kw: CreateConfigRTX(compute_capabilities=ccs, **kw),
                                          workspace_bytes=None)
    finally:
        if graph != source:
            graph.unlink(missing_ok=True)
            graph.with_name(graph.name + ".data").unlink(missing_ok=True)
    return BuildResult(info={"execution_provider": "TensorRT-RTX", "strongly_typed": True,
                             "compute_capabilities": targets_of(target), **info, **extra})


def _use_tensorrt_rtx_in_polygraphy() -> None:
    """Point Polygraphy's TensorRT loaders at tensorrt_rtx (what POLYGRAPHY_USE_TENSORRT_RTX=1 does). Polygraphy
    binds its TensorRT module when polygraphy.backend.trt is first imported, so a process that already built
    with full TensorRT cannot switch."""
    import sys

    from polygraphy import config as polygraphy_config

    if "polygraphy.backend.trt" in sys.modules and not polygraphy_config.USE_TENSORRT_RTX:
        raise EngineBuildError("this process already loaded Polygraphy for full TensorRT; TensorRT-RTX engines "
                               "are built with another module. Fix: build them in a separate `sprintrt build` run")
    polygraphy_config.USE_TENSORRT_RTX = True
