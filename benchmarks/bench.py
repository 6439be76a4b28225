"""`sprintrt bench`: latency, memory and image agreement of sprintrt engines against PyTorch baselines.

Honest by construction: one checkpoint, the same prompt, sizes and torch noise for every system; each
system loaded and timed in a process of its own (benchmarks/systems.py); warm-up runs, then timed runs
(min / median / p90); every image compared with the diffusers fp32 image.

The pieces: what is measured (config.py), the inputs made once (prepare.py), the systems and their
processes (systems.py), how runs are timed (measure.py) and the results document with its Markdown
and chart (report.py). This module runs them in order.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from sprintrt import defaults as D
from sprintrt.benchmarks.config import REFERENCE_BASELINE, BenchConfig, system_name
from sprintrt.benchmarks.measure import steps_run
from sprintrt.benchmarks.prepare import prepare
from sprintrt.benchmarks.report import SCHEMA, validate
from sprintrt.benchmarks.systems import SystemFailed, run_isolated
from sprintrt.export_info import EXPORT_INFO, weights_bytes
from sprintrt.files import model_identity
from sprintrt.metrics import max_abs, psnr


def run_bench(config: BenchConfig, say=print) -> dict:
    """Run the benchmark; returns the results document (see benchmarks/report.py)."""
    from rich.progress import Progress

    config.check()
    ckpt, onnx_dir, engines = prepare(config, say)
    model, onnx_bytes = _model_facts(ckpt, onnx_dir, config)
    chi = list(D.DEFAULT_COMPLEX_HUMAN_INSTRUCTION) if config.complex_human_instruction else None
    systems = config.systems()
    shapes = [(r, b, s) for r in config.resolutions for b in config.batches for s in config.steps]
    results = {shape: [] for shape in shapes}
    failed = []
    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=len(systems))
        for system, kind in systems:
            name = system_name(system)
            bar.update(task, description=f"{name}: {len(shapes)} shapes x ({config.warmup} warm-up + {config.runs} runs)")
            try:
                entries = run_isolated(system, kind, ckpt, engines, shapes, config, chi)
            except SystemFailed as e:
                if name == REFERENCE_BASELINE:  # nothing to compare the others with
                    raise
                say(f"{name} not measured: {e}")
                failed.append({"name": name, "kind": kind, "error": str(e)})
                entries = []
            for shape, entry in zip(shapes, entries):
                results[shape].append(entry)
            bar.advance(task)
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "model": {"source": config.model or f"seeded random {config.arch} (seed {config.seed})", "arch": config.arch,
                  "identity": model["identity"]},
        "settings": {"warmup": config.warmup, "runs": config.runs, "prompt": config.prompt,
                     "complex_human_instruction": config.complex_human_instruction,
                     "text_length": _text_length(model["chi_tokens"], config), "threads": config.threads,
                     "reference": REFERENCE_BASELINE, "binning": False, "strength": config.strength,
                     "controlnet": config.controlnet,
                     "torch_device": config.torch_device},
        "onnx_bytes": onnx_bytes,
        "results": [],
        "failed": failed,
    }
    for ((h, w), batch, steps), entries in results.items():
        ref = next(e["_image"] for e in entries if e["name"] == REFERENCE_BASELINE)
        for e in entries:
            img = e.pop("_image")
            e["image_vs_reference"] = {"max_abs": max_abs(img, ref), "psnr_db": psnr(img, ref)}
        doc["results"].append({"height": h, "width": w, "batch": batch, "steps": steps,
                               "steps_run": steps_run(steps, config.strength), "systems": entries})
    validate(doc)
    return doc


def _model_facts(ckpt: Path, onnx_dir: Path | None, config: BenchConfig) -> tuple[dict, dict]:
    """({identity, chi_tokens}, {component: ONNX bytes}) from the export, or from the checkpoint's configs
    when nothing was exported (a baselines-only run)."""
    if onnx_dir is not None:
        info = json.loads((onnx_dir / EXPORT_INFO).read_text())
        return ({"identity": info["model"]["identity"], "chi_tokens": info["model_dims"]["chi_tokens"]},
                {c: weights_bytes(r) for c, r in info["components"].items()})
    from sprintrt.export.onnx_export import model_facts, resolve_vae

    vae_dir = resolve_vae(config.vae) if config.vae else None
    return {"identity": model_identity(ckpt, vae_dir), "chi_tokens": model_facts(ckpt, vae_dir)[0].chi_tokens}, {}


def _text_length(chi_tokens: int, config: BenchConfig) -> int:
    chi = chi_tokens if config.complex_human_instruction else None
    return D.tokenized_length(D.DEFAULT_MAX_SEQUENCE_LENGTH, chi)


def machine() -> dict:
    from sprintrt import machine as probe

    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        mem = None
    return {"cpu": probe.cpu_target(), "cores": os.cpu_count(), "memory_gb": mem, "gpus": probe.gpus(),
            "os": platform.platform()}


def versions() -> dict:
    from sprintrt.files import installed_versions

    return installed_versions(("sprintrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt",
                               "openvino", "numpy"))
