"""The benchmark's inputs, made once and cached in its work directory: checkpoint → ONNX → one engine
directory per sprintrt candidate, named by the model's identity."""

from __future__ import annotations

import json
from pathlib import Path

from sprintrt.benchmarks.config import BenchConfig, is_auto, system_name
from sprintrt.engines.precision import QUANTIZED, EngineChoice, Precision
from sprintrt.errors import InvalidInputError
from sprintrt.export_info import EXPORT_INFO
from sprintrt.files import model_identity
from sprintrt.manifest import read_manifest
from sprintrt.specs import ModelDims


def prepare(config: BenchConfig, say=print) -> tuple[Path, Path | None, dict[EngineChoice, Path]]:
    """(checkpoint, ONNX directory or None, {candidate: engine directory}), built or reused."""
    from sprintrt.engines.build import build_engines
    from sprintrt.export.checkpoint import CONTROLNET_FOLDER, make_checkpoint
    from sprintrt.export.onnx_export import export_model, exporter_fingerprint, resolve_model, resolve_vae
    from sprintrt.export.typed import variant_dtypes

    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if config.model:
        ckpt = resolve_model(config.model)
    else:
        ckpt = work / f"checkpoint-{config.arch}-seed{config.seed}{'-controlnet' if config.controlnet else ''}"
        if not (ckpt / "model_index.json").exists():
            say(f"making a seeded random {config.arch} checkpoint{' with a ControlNet' if config.controlnet else ''} "
                f"in {ckpt}")
            make_checkpoint(ckpt, config.arch, config.seed, controlnet=config.controlnet)
    if config.controlnet and not (ckpt / CONTROLNET_FOLDER / "config.json").is_file():
        raise InvalidInputError(f"controlnet=True needs a checkpoint with a controlnet/ folder; {str(ckpt)!r} has none. "
                                "Fix: benchmark a checkpoint with its ControlNet, or make one with `sprintrt "
                                "make-checkpoint DIR --controlnet`")
    if not config.candidates:  # baselines only: nothing to export or build
        return ckpt, None, {}
    identity = model_identity(ckpt, resolve_vae(config.vae) if config.vae else None)
    onnx_dir = work / f"onnx-{identity[:12]}"
    info_path = onnx_dir / EXPORT_INFO
    dtypes = ("fp32", *variant_dtypes_for(config.candidates))
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    stale = info is not None and info.get("exporter") != exporter_fingerprint()
    if stale:
        say(f"{onnx_dir} was exported by other export code: exporting again")
    missing = info is not None and any(d not in r.get("variants", {}) for c, r in info["components"].items()
                                       for d in variant_dtypes(c, dtypes))
    if stale or missing or info is None:
        say(f"exporting {ckpt} to {onnx_dir}")
        export_model(ckpt, onnx_dir, progress=lambda c: say(f"  exporting + validating {c}"), vae=config.vae,
                     dtypes=dtypes)
    engines = {}
    size = max(max(r) for r in config.resolutions)
    for cand in config.candidates:
        label = "tuned" if cand.precision is None else cand.precision.value
        engine_dir = work / f"engines-{identity[:12]}-{cand.backend}-{label}"
        say(f"building {system_name(cand)} engines in {engine_dir}")
        if is_auto(cand):
            from sprintrt.tuning.tune import tune_engines

            engines[cand] = tune_engines(onnx_dir, engine_dir, count=config.calibration_count, size=size,
                                         progress=lambda msg: say(f"  {msg}"))
        elif cand.precision in QUANTIZED:
            from sprintrt.tuning.calibration import build_quantized_engines

            engines[cand] = build_quantized_engines(onnx_dir, engine_dir, count=config.calibration_count, size=size,
                                                    progress=lambda msg: say(f"  {msg}"), backend=cand.backend,
                                                    precision=cand.precision)
        else:
            engines[cand] = build_engines(onnx_dir, engine_dir, backend=cand.backend, precision=cand.precision)
        _check_profile(engines[cand], cand, config)
    return ckpt, onnx_dir, engines


def variant_dtypes_for(cands) -> list[str]:
    """Typed variants the candidates build from: bf16/fp16 candidates (TensorRT, ONNX Runtime fp16, OpenVINO
    bf16), and for `auto` the 16-bit types the tuner's candidates compute in on this CPU."""
    from sprintrt.tuning.tune import typed_dtypes_here

    wanted = {c.precision.value for c in cands if c.precision in (Precision.BF16, Precision.FP16)}
    if any(is_auto(c) for c in cands):
        wanted |= set(typed_dtypes_here())
    return sorted(wanted)


def _check_profile(engine_dir: Path, cand: EngineChoice, config: BenchConfig) -> None:
    manifest = read_manifest(engine_dir)
    f = ModelDims.from_json(manifest.data["model_dims"]).vae_scale_factor
    for comp, entry in manifest.components.items():
        dims = entry["io"]["dims"]
        for h, w in config.resolutions:
            for name, px in (("latent_height", h), ("latent_width", w)):
                if name in dims and not dims[name]["min"] <= px // f <= dims[name]["max"]:
                    lo, hi = dims[name]["min"] * f, dims[name]["max"] * f
                    raise InvalidInputError(f"resolution {h}x{w} is outside the {system_name(cand)} {comp} engine's "
                                            f"profile ({name.split('_')[1]} {lo}..{hi} px). Fix: benchmark inside it "
                                            "or rebuild the engines with a wider profile")
        for b in config.batches:
            if "batch" in dims and not dims["batch"]["min"] <= b <= dims["batch"]["max"]:
                raise InvalidInputError(f"batch {b} is outside the {system_name(cand)} {comp} engine's profile "
                                        f"({dims['batch']['min']}..{dims['batch']['max']}). Fix: smaller --batches")
