"""ONNX directory → engine directory: validate the sources, build each component, write the manifest.

The steps every backend shares live here (reading the export, checking the ONNX files, the cache
key, reuse of an up-to-date engine, the lock, atomic writes, the manifest); a backend module only
turns one ONNX file into one engine file (`engines/ort_build.py`, later `engines/trt_build.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from sprintrt.engines import manifest as M
from sprintrt.engines.precision import QUANTIZED, Precision, resolve_precisions
from sprintrt.engines.profiles import ProfileOptions, full_profile, input_shapes, tensorrt_profile
from sprintrt.errors import EngineDirError, InvalidInputError, ModelLoadError
from sprintrt.files import sha256_file
from sprintrt.export import specs as S

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def read_export_info(onnx_dir: Path) -> dict:
    path = onnx_dir / S.EXPORT_INFO
    if not onnx_dir.is_dir() or not path.is_file():
        raise ModelLoadError(f"{str(onnx_dir)!r} is not an sprintrt ONNX directory (no {S.EXPORT_INFO}). "
                             f"Fix: create it with `sprintrt export MODEL -o {onnx_dir}`")
    return json.loads(path.read_text())


def check_onnx_file(onnx_dir: Path, component: str, record: dict) -> Path:
    """The ONNX file must be exactly the one the export wrote (size and sha256): catches truncation."""
    path = onnx_dir / record["file"]
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing. Fix: re-run `sprintrt export` into {onnx_dir}")
    for entry in (record, record.get("external_data")):
        if not entry:
            continue
        f = onnx_dir / entry["file"]
        size = f.stat().st_size if f.is_file() else 0
        if size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise ModelLoadError(f"{f} has {size} bytes and a different sha256 than the export wrote "
                                 f"({entry['bytes']} bytes): it is truncated, missing or was modified. Fix: re-run "
                                 f"`sprintrt export` into {onnx_dir}")
    return path


def auto_backend() -> str:
    """The backend that wins on this machine: TensorRT with an NVIDIA GPU and TensorRT; else OpenVINO
    where it is installed and the CPU has bf16 instructions (bf16 kernels, which ONNX Runtime's CPU
    provider lacks); else ONNX Runtime."""
    from sprintrt.engines import ov_build, trt_build
    from sprintrt.errors import MissingDependencyError

    try:
        trt_build.target(), trt_build.versions()
        return "tensorrt"
    except MissingDependencyError:
        pass
    try:
        ov_build.versions()
    except MissingDependencyError:
        return "onnxruntime"
    isa = set(M.cpu_target()["isa"])
    return "openvino" if {"avx512_bf16", "amx_bf16"} & isa else "onnxruntime"


def _backend_module(backend: str):
    if backend == "onnxruntime":
        from sprintrt.engines import ort_build
        return ort_build
    if backend == "tensorrt":
        from sprintrt.engines import trt_build
        return trt_build
    if backend == "openvino":
        from sprintrt.engines import ov_build
        return ov_build
    raise InvalidInputError(f"backend={backend!r} is not known: expected one of {list(BACKENDS) + ['auto']}. "
                            "Fix: pass --backend auto, onnxruntime or openvino (CPU), or tensorrt (NVIDIA GPU)")


def build_engines(onnx_dir: str | Path, engine_dir: str | Path, backend: str = "onnxruntime",
                  precision=None, components=S.COMPONENTS, rebuild: bool = False,
                  profile: ProfileOptions | None = None, calibration: dict | None = None,
                  progress: Callable[[str, str], None] | None = None) -> Path:
    """Build (or reuse) one engine per component and write engine_dir/manifest.json. Returns engine_dir.

    Args:
        precision: None (the backend's per-component defaults), one precision for all, a dict, or
            "transformer=fp16,vae_decoder=fp32".
        profile: TensorRT shape-profile options (ONNX Runtime engines accept the spec's full ranges).
        calibration: for int8/fp8 components, {component: (description, input feeds)}, the feeds a
            list or a callable returning one (called only if the engine is built, not reused); the
            description (prompts, count, size) goes into the engine key.

    Everything that can fail without building (arguments, sources, the backend's presence) is checked
    before anything is written. An engine whose key (target, library version, precision, profile,
    source ONNX hash) matches and whose file is intact is reused unless `rebuild`. Files are written
    under new names and the manifest is switched atomically, so an interrupted build leaves the
    previous engine directory usable and no half-written engine file is ever referenced.
    """
    from filelock import FileLock

    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    if backend == "auto":
        backend = auto_backend()
    backend_mod = _backend_module(backend)
    if backend == "tensorrt" and precision is None:  # TensorRT 11 cannot build the bf16 defaults (no weak typing)
        precision = backend_mod.default_precision(backend_mod.versions()[backend_mod.LIBRARY])
    precisions = resolve_precisions(precision, backend, components)
    info = read_export_info(onnx_dir)
    missing = [c for c in components if c not in info["components"]]
    if missing:
        raise ModelLoadError(f"{onnx_dir} has no export of {missing}. Fix: `sprintrt export MODEL -o {onnx_dir}`")
    sources = {c: check_onnx_file(onnx_dir, c, info["components"][c]) for c in components}
    model = S.model_dims_from_json(info["model_dims"])
    specs = {c: S.SPEC_BUILDERS[c](model) for c in components}
    if backend == "tensorrt":
        _refuse_unready(info, components)
        profiles = {c: tensorrt_profile(specs[c], model, profile or ProfileOptions()) for c in components}
    else:
        profiles = {c: full_profile(specs[c]) for c in components}
    for comp, prec in precisions.items():
        if prec in QUANTIZED and not (calibration or {}).get(comp):
            raise InvalidInputError(f"precision {prec.value} for {comp} needs calibration data. Fix: build with the CLI "
                                    f"(`sprintrt build ... --precision {comp}={prec.value}` calibrates on a prompt file) "
                                    "or pass calibration={component: (description, feeds)}")
    target, versions = backend_mod.target(), backend_mod.versions()  # raise before anything is written
    if backend == "tensorrt":
        for prec in precisions.values():
            backend_mod.check_buildable(prec, versions[backend_mod.LIBRARY], target)

    engine_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(engine_dir / ".build.lock")):
        old = _read_existing(engine_dir, info)
        entries = {}
        for comp in components:
            record, prec = info["components"][comp], precisions[comp]
            label = prec.value
            if prec in QUANTIZED:  # the calibration set is part of what the engine computes
                label += "-" + hashlib.sha256(calibration[comp][0].encode()).hexdigest()[:8]
            key = M.cache_key(target, backend, versions[backend_mod.LIBRARY], label, profiles[comp], record["sha256"])
            prev = old.get(comp) if old else None
            if not rebuild and prev and prev["key"] == key and _intact(engine_dir, prev):
                if progress:
                    progress(comp, "reused")
                entries[comp] = prev
                continue
            if progress:
                progress(comp, "building")
            path = engine_dir / f"{comp}-{hashlib.sha256(key.encode()).hexdigest()[:12]}{backend_mod.SUFFIX}"
            t0 = time.perf_counter()
            source, quant_info = sources[comp], {}
            if prec in QUANTIZED:
                from sprintrt.engines.quantize import quantize_qdq

                source = path.with_name(path.name + ".qdq.onnx")
                feeds = calibration[comp][1]
                feeds = feeds() if callable(feeds) else feeds  # recorded only when the engine is built
                quant_info = quantize_qdq(sources[comp], source, feeds, prec.value)
                quant_info["calibration"] = calibration[comp][0]
            try:
                build_info = backend_mod.build_component(source, path, comp, prec,
                                                         input_shapes(specs[comp], profiles[comp]), target, versions)
            finally:
                if source != sources[comp]:  # the Q/DQ graph lives on inside the built engine
                    source.unlink(missing_ok=True)
                    source.with_name(source.name + ".data").unlink(missing_ok=True)
            build_info.update(quant_info)
            io = dict(record["spec"], dims=profiles[comp])
            sidecars = [_file_entry(p) for p in build_info.pop("_sidecars", [])]
            entries[comp] = {
                **_file_entry(path), "sidecars": sidecars,
                "backend": backend, "precision": prec.value, **build_info,
                "key": key, "target": target, "libraries": versions,
                "source_onnx": {"file": record["file"], "sha256": record["sha256"]},
                "model_identity": info["model"]["identity"],
                "io": io, "build_seconds": round(time.perf_counter() - t0, 2),
            }
        if old:  # keep engines of components not rebuilt this time, if they belong to the same model
            for comp, entry in old.items():
                entries.setdefault(comp, entry)
        _copy_tokenizer(onnx_dir, engine_dir)
        manifest = M.Manifest(engine_dir / M.MANIFEST, {
            "format": M.FORMAT,
            "model": info["model"], "model_dims": info["model_dims"], "pipeline": info["pipeline"],
            "tokenizer": "tokenizer", "components": entries,
        })
        manifest.write()
        _remove_unreferenced(engine_dir, entries)
    return engine_dir


def _refuse_unready(info: dict, components) -> None:
    for comp in components:
        findings = info["components"][comp].get("trt_lint", [])
        if findings:
            raise ModelLoadError(f"{comp}.onnx is not ready for TensorRT: {findings[0]}"
                                 f"{f' (and {len(findings) - 1} more)' if len(findings) > 1 else ''}. "
                                 "Fix: re-export with this sprintrt version, whose graph passes remove these ops")


def _read_existing(engine_dir: Path, info: dict) -> dict | None:
    """Components of an existing manifest of the same model, or None (another model: all rebuilt)."""
    try:
        old = M.read_manifest(engine_dir)
    except EngineDirError:
        return None
    if old.data["model"]["identity"] != info["model"]["identity"]:
        return None
    return dict(old.components)


def _file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _intact(engine_dir: Path, entry: dict) -> bool:
    for e in (entry, *entry.get("sidecars", [])):
        path = engine_dir / e["file"]
        if not (path.is_file() and path.stat().st_size == e["bytes"] and sha256_file(path) == e["sha256"]):
            return False
    return True


def _copy_tokenizer(onnx_dir: Path, engine_dir: Path) -> None:
    tmp = engine_dir / f".tokenizer.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(onnx_dir / "tokenizer", tmp)
    shutil.rmtree(engine_dir / "tokenizer", ignore_errors=True)
    tmp.rename(engine_dir / "tokenizer")


def _remove_unreferenced(engine_dir: Path, entries: dict) -> None:
    keep = {e["file"] for e in entries.values()} | {s["file"] for e in entries.values() for s in e.get("sidecars", [])}
    keep |= {f + ".data" for f in keep}
    for comp in S.COMPONENTS:
        for f in engine_dir.glob(f"{comp}-*"):
            if f.name not in keep:
                f.unlink()
