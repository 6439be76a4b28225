"""ONNX directory → engine directory: plan the build, build (or reuse) each component, write the manifest.

`plan_build` does everything that can fail without building (arguments, sources, the backend's
presence and what it can build here, the cache keys) and writes nothing; `build_component` turns one
planned component into an engine file and its manifest entry; `build_engines` runs both under the
directory's lock and switches the manifest atomically. The backend-specific work is behind the
BuildBackend contract (engines/registry.py): no backend is named here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sprintrt import manifest as M
from sprintrt import specs as S
from sprintrt.defaults import DEFAULT_BACKEND
from sprintrt.engines.precision import QUANTIZED, Precision, PrecisionRequest, resolve_precisions
from sprintrt.engines.profiles import ProfileOptions, input_shapes
from sprintrt.engines.registry import AUTO, BuildBackend, BuildResult, auto_backend, backend_module, canonical
from sprintrt.errors import (EngineBuildError, EngineDirError, InvalidInputError, ModelLoadError, OutOfSpaceError,
                             SprintError)
from sprintrt.export_info import check_onnx_file, read_export_info
from sprintrt.files import file_mismatch, sha256_file
from sprintrt.machine import library_version


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def cache_key(target: dict, backend: str, library_version: str, precision: str, dims: dict, onnx_sha256: str) -> str:
    """Readable, complete key: device + backend version + precision + profile + source ONNX hash.

    Every field that changes what the engine computes or where it may run is in the key, so a
    cached engine is reused only for exactly the same inputs (demoDiffusion's omits GPU and profile).
    """
    if target["kind"] == "cpu":
        device = f"{target['arch']}-{'.'.join(target['isa']) or 'baseline'}"
    else:
        device = f"{target['name']}-sm{target['compute_capability']}"
    profile = "_".join(f"{n}{d['min']}-{d['opt']}-{d['max']}" for n, d in sorted(dims.items()))
    return "__".join(_slug(p) for p in (device, f"{backend}{library_version}", precision, profile, onnx_sha256[:16]))


@dataclass(frozen=True)
class ComponentPlan:
    """One component to build: where from, in which precision, for which shapes, under which key."""

    name: str
    source: Path
    precision: Precision
    profile: dict
    spec: S.ComponentSpec
    key: str
    record: dict  # the component's export record (its spec, its fp32 graph)
    source_record: dict  # the record of the graph built from: the fp32 graph or a typed variant
    source_dtype: str  # "fp32", or the typed variant's dtype (for int8/fp8: the base the Q/DQ pairs go into)
    fp32_source: Path  # the fp32 graph (what int8/fp8 calibration runs)
    quant_label: str | None = None  # int8/fp8: the recipe and what decides the Q/DQ graph (engines/quantize.py)


@dataclass(frozen=True)
class BuildPlan:
    onnx_dir: Path
    engine_dir: Path
    backend: str
    module: BuildBackend
    info: dict  # export_info.json
    target: dict
    versions: dict
    components: tuple[ComponentPlan, ...]
    calibration: dict
    qdq_cache: Path | None = None  # where Q/DQ graphs are kept for other builds of the same run (the tuner's)
    uniform_int8: bool = False  # int8 without measured sensitivity (quantize.measured): the tuner's speed probes
    compiled_cache: bool = True  # fill a backend's compiled-model cache at build (BuildBackend.build_component)


def plan_build(onnx_dir: str | Path, engine_dir: str | Path, backend: str = DEFAULT_BACKEND, precision=None,
               components=None, profile: ProfileOptions | None = None,
               calibration: dict | None = None, qdq_cache: Path | None = None, target: str | None = None,
               uniform_int8: bool = False, compiled_cache: bool = True) -> BuildPlan:
    """Check everything that can fail without building and derive each component's key. Writes nothing.
    `components` None means every component the export holds; `target` names what an ahead-of-time backend
    builds for (TensorRT-RTX's compute capabilities)."""
    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    backend = auto_backend() if backend == AUTO else canonical(backend)
    mod = backend_module(backend)
    calibration = calibration or {}
    request = PrecisionRequest.parse(precision)
    info = read_export_info(onnx_dir)
    if components is None:
        components = tuple(c for c in S.COMPONENTS if c in info["components"])
    missing = [c for c in components if c not in info["components"]]
    if missing:
        raise ModelLoadError(f"{onnx_dir} has no export of {missing}. Fix: `sprintrt export MODEL -o {onnx_dir}`")
    # Precisions first: a wrong --precision is an error even on a machine that lacks the backend.
    resolve_precisions(request, backend, components)
    target_info, versions = mod.build_target(target), mod.library_versions()  # raise before anything is written
    precisions = resolve_precisions(request, backend, components, mod.default_precisions(versions, target_info))
    model = S.ModelDims.from_json(info["model_dims"])
    plans = []
    for comp in components:
        record, prec = info["components"][comp], precisions[comp]
        if prec in QUANTIZED and not calibration.get(comp):
            raise InvalidInputError(f"precision {prec.value} for {comp} needs calibration data. Fix: build with the CLI "
                                    f"(`sprintrt build ... --precision {comp}={prec.value}` calibrates on a prompt file) "
                                    "or pass calibration={component: (description, feeds)}")
        dtype = _source_dtype(comp, prec, mod, target_info, record)
        source_record = _source_record(onnx_dir, comp, record, prec, dtype, mod)
        mod.check_buildable(comp, prec, source_record, versions, target_info)
        source = check_onnx_file(onnx_dir, comp, source_record)
        fp32_source = check_onnx_file(onnx_dir, comp, record) if prec in QUANTIZED else onnx_dir / record["file"]
        spec = S.SPEC_BUILDERS[comp](model)
        dims = mod.profile(spec, model, profile or ProfileOptions())
        libraries = mod.PRECISION_LIBRARIES.get(prec, ())  # e.g. int8w: "int8w-nncf3.4.0"
        label = "-".join([prec.value, *(f"{lib}{library_version(lib)}" for lib in libraries)])
        quant_label = None
        if prec in QUANTIZED:  # the recipe and the calibration set are part of what the engine computes
            from sprintrt.engines.quantize import recipe_label

            label = quant_label = recipe_label(prec.value, target_info, comp, calibration[comp][0], uniform_int8)
        revision = mod.KEY_REVISIONS.get(prec)  # how the backend builds it changed (see there)
        label += f"-{revision}" if revision else ""
        key = cache_key(target_info, backend, versions[mod.LIBRARY], label, dims, source_record["sha256"])
        plans.append(ComponentPlan(comp, source, prec, dims, spec, key, record, source_record, dtype, fp32_source,
                                   quant_label))
    return BuildPlan(onnx_dir, engine_dir, backend, mod, info, target_info, versions, tuple(plans), calibration,
                     Path(qdq_cache) if qdq_cache else None, uniform_int8, compiled_cache)


def _source_dtype(comp: str, prec: Precision, mod: BuildBackend, target: dict, record: dict) -> str:
    """Which exported graph `prec` is built from: the typed variant for the backend's typed precisions
    (bf16/fp16 on TensorRT, fp16 on ONNX Runtime, bf16 on OpenVINO where the export has it), the backend's
    16-bit base for int8/fp8 (TensorRT: the layers not quantized run in it) and int8w (OpenVINO on bf16 CPUs,
    where the export has it), else the fp32 graph."""
    if prec in mod.TYPED_PRECISIONS:
        if prec in mod.VARIANT_OPTIONAL and prec.value not in record.get("variants", {}):
            return "fp32"
        return prec.value
    if prec in QUANTIZED or prec == Precision.INT8W:
        base = mod.quantized_base(comp, target, prec)
        if base is None or (prec in mod.VARIANT_OPTIONAL and base.value not in record.get("variants", {})):
            return "fp32"
        return base.value
    return "fp32"


def _source_record(onnx_dir: Path, comp: str, record: dict, prec: Precision, dtype: str, mod: BuildBackend) -> dict:
    if dtype == "fp32":
        return record
    variant = record.get("variants", {}).get(dtype)
    if variant is None:
        what = f"{prec.value} from one" if dtype == prec.value else f"{prec.value} on a {dtype} base (the layers " \
                                                                   f"not quantized run in {dtype})"
        raise ModelLoadError(f"{onnx_dir} has no {dtype} variant of {comp} (exported dtypes: "
                             f"{['fp32', *record.get('variants', {})]}), and {mod.NAME} builds {what}. "
                             f"Fix: `sprintrt export MODEL -o {onnx_dir} --dtypes fp32,{dtype}`"
                             + (", or build --precision fp32" if dtype == prec.value else ""))
    return variant


def build_component(plan: BuildPlan, comp: ComponentPlan, say: Callable[[str], None] = lambda msg: None) -> dict:
    """Build one planned component into the engine directory (`say`: the quantizer's progress). Returns its
    manifest entry."""
    path = plan.engine_dir / f"{comp.name}-{hashlib.sha256(comp.key.encode()).hexdigest()[:12]}{plan.module.SUFFIX}"
    t0 = time.perf_counter()
    source, quant_info = comp.source, {}
    try:
        if comp.precision in QUANTIZED:
            source, quant_info = _quantized_source(plan, comp, path, say)
        try:
            result: BuildResult = plan.module.build_component(source, path, comp.name, comp.precision,
                                                              input_shapes(comp.spec, comp.profile), plan.target,
                                                              plan.versions, compiled_cache=plan.compiled_cache)
        finally:
            temporary = source != comp.source and (plan.qdq_cache is None or source.parent != plan.qdq_cache)
            if temporary:  # the Q/DQ graph lives on inside the built engine
                source.unlink(missing_ok=True)
                source.with_name(source.name + ".data").unlink(missing_ok=True)
    except SprintError:
        raise
    except Exception as e:  # the engine libraries raise their own types (ONNX Runtime's Fail is no RuntimeError)
        raise _library_failure(plan, comp, e) from e
    return {
        **_file_entry(path), "extra_files": [_file_entry(p) for p in result.extra_files],
        "backend": plan.backend, "precision": comp.precision.value, **result.info, **quant_info,
        "key": comp.key, "target": plan.target, "libraries": plan.versions,
        "source_onnx": {"file": comp.source_record["file"], "sha256": comp.source_record["sha256"]},
        "model_identity": plan.info["model"]["identity"],
        "io": dict(comp.record["spec"], dims=comp.profile), "build_seconds": round(time.perf_counter() - t0, 2),
    }


def _library_failure(plan: BuildPlan, comp: ComponentPlan, error: Exception) -> EngineBuildError:
    """A typed error for an engine library's (or the quantizer's) failure: OutOfSpaceError where it is a full disk
    (the tuner stops on it), else EngineBuildError (the tuner records the candidate as failed and goes on)."""
    import errno

    what = f"{plan.backend} {comp.precision.value} engine of {comp.name}"
    free = shutil.disk_usage(plan.engine_dir).free
    weights = comp.source.with_name(comp.source.name + ".data")
    needed = comp.source.stat().st_size + (weights.stat().st_size if weights.exists() else 0)
    message = str(error)
    # A library reports a full disk in its own words (ONNX Runtime: "Failed to write external initializers"): a
    # failed write with less room left than the source's size is one; any other failure is the library's own.
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in message or (
            free < needed and "write" in message.lower()):
        return OutOfSpaceError(f"building the {what} ran out of disk space in {plan.engine_dir}: {free / 2**30:.1f} GB "
                               f"free now, and its source alone is {needed / 2**30:.1f} GB ({error}). Fix: free space "
                               "there, or build into a directory on a disk with more room (-o)")
    return EngineBuildError(f"{plan.module.LIBRARY} failed to build the {what}: {error}. Fix: check the export with "
                            "`sprintrt doctor`, or build this component with another backend or precision")


def _quantized_source(plan: BuildPlan, comp: ComponentPlan, path: Path, say) -> tuple[Path, dict]:
    """The Q/DQ graph an int8/fp8 engine is built from: calibrated on the fp32 graph, then carried onto the
    16-bit base where the backend has one (engines/typed_qdq.py). A temporary file beside `path` unless
    the plan keeps Q/DQ graphs in a cache."""
    qdq, info = _calibrated_qdq(plan, comp, path, say)
    if comp.source_dtype == "fp32":
        return qdq, info
    from sprintrt.engines.typed_qdq import qdq_on_variant

    typed = path.with_name(path.name + f".qdq-{comp.source_dtype}.onnx")
    try:
        info = {**info, **qdq_on_variant(qdq, comp.fp32_source, comp.source, typed, comp.source_dtype)}
    finally:
        if plan.qdq_cache is None:
            qdq.unlink(missing_ok=True)
            qdq.with_name(qdq.name + ".data").unlink(missing_ok=True)
    return typed, info


def _calibrated_qdq(plan: BuildPlan, comp: ComponentPlan, path: Path, say) -> tuple[Path, dict]:
    """(the fp32 Q/DQ graph, what quantize_qdq did), reused from the plan's cache when it holds one made
    from the same graph by the same recipe and calibration (another backend of the tuner's run)."""
    from sprintrt.engines.quantize import quantize_qdq

    description, feeds = plan.calibration[comp.name]
    if plan.qdq_cache is None:
        qdq, record = path.with_name(path.name + ".qdq.onnx"), None
    else:
        digest = hashlib.sha256((comp.record["sha256"] + comp.quant_label).encode()).hexdigest()[:16]
        qdq = plan.qdq_cache / f"{comp.name}-{digest}.qdq.onnx"
        record = qdq.with_name(qdq.name + ".json")  # written last: its presence means the graph is complete
        if record.is_file() and qdq.is_file():
            return qdq, json.loads(record.read_text())
        plan.qdq_cache.mkdir(parents=True, exist_ok=True)
    feeds = feeds() if callable(feeds) else feeds  # recorded only when the engine is built
    info = quantize_qdq(comp.fp32_source, qdq, feeds, comp.precision.value, target=plan.target, component=comp.name,
                        uniform=plan.uniform_int8, say=say)
    info["calibration"] = description
    if record is not None:
        record.write_text(json.dumps(info))
    return qdq, info


def build_engines(onnx_dir: str | Path, engine_dir: str | Path, backend: str = DEFAULT_BACKEND,
                  precision=None, components=None, rebuild: bool = False,
                  profile: ProfileOptions | None = None, calibration: dict | None = None,
                  progress: Callable[[str, str], None] | None = None, qdq_cache: Path | None = None,
                  target: str | None = None, uniform_int8: bool = False, compiled_cache: bool = True) -> Path:
    """Build (or reuse) one engine per component and write engine_dir/manifest.json. Returns engine_dir.

    Args:
        backend: onnxruntime, openvino, tensorrt (or ort/ov/trt), or auto.
        components: which to build (default: every component the export holds).
        precision: None (the backend's per-component defaults), one precision for all, a dict, or
            "transformer=fp16,vae_decoder=fp32".
        profile: TensorRT shape-profile options (ONNX Runtime and OpenVINO engines take the spec's ranges).
        calibration: for int8/fp8 components, {component: (description, input feeds)}, the feeds a
            list or a callable returning one (called only if the engine is built, not reused); the
            description (prompts, count, size) goes into the engine key.
        qdq_cache: keep the calibrated Q/DQ graphs there and reuse them (the tuner builds the same int8
            graph for ONNX Runtime and OpenVINO); None: quantize into a temporary file.
        target: what a backend that builds ahead of time builds for (TensorRT-RTX: compute capabilities,
            "8.6,8.9,12.0"; None: its default); the other backends build for this machine and refuse one.
        progress: called with (component, what is happening): "building" or "reused", then, while an int8/fp8
            graph is written, the quantizer's steps (minutes at real size: its ranges, each layer group's
            sensitivity, the graph).
        uniform_int8: quantize every int8 layer a recipe allows, without measuring which cost the picture
            (engines/sensitivity.py): the fastest an int8 engine of the component can be, whatever its
            ranges; what the tuner screens int8 speed with before calibrating (never a shipped engine).
        compiled_cache: fill the compiled-model cache a backend keeps beside its engines (OpenVINO's blobs) now, so
            the first load is fast; False leaves it to the first load that reads the cache (the tuner's
            candidates: most are deleted minutes later, and the chosen one is compiled again where it moves).

    An engine whose key (target, library version, precision, profile, source ONNX hash) matches and
    whose files are intact is reused unless `rebuild`. Files are written under new names and the
    manifest is switched atomically, so an interrupted build leaves the previous engine directory
    usable and no half-written engine file is ever referenced.
    """
    from filelock import FileLock

    plan = plan_build(onnx_dir, engine_dir, backend, precision, components, profile, calibration, qdq_cache, target,
                      uniform_int8, compiled_cache)
    plan.engine_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(plan.engine_dir / ".build.lock")):
        old = read_existing(plan.engine_dir, plan.info)
        entries = {}
        for comp in plan.components:
            prev = old.get(comp.name)
            reuse = not rebuild and prev is not None and prev["key"] == comp.key and intact(plan.engine_dir, prev)
            if progress:
                progress(comp.name, "reused" if reuse else "building")
            say = (lambda msg, c=comp.name: progress(c, msg)) if progress else (lambda msg: None)
            entries[comp.name] = prev if reuse else build_component(plan, comp, say)
        write_manifest(plan.onnx_dir, plan.engine_dir, plan.info, {**old, **entries})
    return plan.engine_dir


def write_manifest(onnx_dir: Path, engine_dir: Path, info: dict, entries: dict) -> None:
    """Switch engine_dir's manifest to `entries` ({component: entry}, backends may differ per component),
    copy the tokenizer and delete engine files no entry references. Call under engine_dir's build lock."""
    _copy_tokenizer(Path(onnx_dir), engine_dir)
    M.Manifest(engine_dir / M.MANIFEST, {
        "format": M.FORMAT, "model": info["model"], "model_dims": info["model_dims"],
        "pipeline": info["pipeline"], "tokenizer": "tokenizer", "components": entries,
    }).write()
    _remove_unreferenced(engine_dir, entries)


def read_existing(engine_dir: Path, info: dict) -> dict:
    """Components of an existing manifest of the same model ({} for none, another model or format)."""
    try:
        old = M.read_manifest(engine_dir)
    except EngineDirError:
        return {}
    if old.data["model"]["identity"] != info["model"]["identity"]:
        return {}
    return dict(old.components)


def _file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def intact(engine_dir: Path, entry: dict) -> bool:
    return not any(file_mismatch(engine_dir / e["file"], e["bytes"], e["sha256"]) for e in M.engine_files(entry))


def _copy_tokenizer(onnx_dir: Path, engine_dir: Path) -> None:
    tmp = engine_dir / f".tokenizer.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(onnx_dir / "tokenizer", tmp)
    shutil.rmtree(engine_dir / "tokenizer", ignore_errors=True)
    tmp.rename(engine_dir / "tokenizer")


def _remove_unreferenced(engine_dir: Path, entries: dict) -> None:
    keep = {e["file"] for entry in entries.values() for e in M.engine_files(entry)}
    for comp in S.COMPONENTS:
        for f in engine_dir.glob(f"{comp}-*"):
            # what the run side derives from an engine it keeps (TensorRT-RTX's runtime cache) stays with it
            if f.name not in keep and not any(f.name.startswith(k + ".") for k in keep):
                f.unlink()
