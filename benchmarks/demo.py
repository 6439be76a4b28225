"""`sprintrt demo`: the whole chain on the embedded tiny checkpoint, timed against diffusers.

make-checkpoint → export (validated) → build (ONNX Runtime) → generate, then the same prompt, size,
steps and torch seed through diffusers' SanaSprintPipeline in the same process: a per-stage latency
table (median of `runs` after one warm-up) and the difference between the two images.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from sprintrt import defaults as D
from sprintrt.benchmarks.measure import stage_seconds
from sprintrt.metrics import max_abs, psnr

ROWS = (("text encoder (+ tokenize)", ("tokenize", "text_encoder")), ("transformer, all steps", ("transformer",)),
        ("VAE decoder", ("vae_decoder",)), ("end to end", ("total",)))


def median_timings(runs: list[dict]) -> dict:
    return {label: statistics.median(sum(stage_seconds(t, k) for k in keys) for t in runs) for label, keys in ROWS}


def run_demo(workdir: Path = D.OUT_DIR / "demo", prompt: str = D.DEFAULT_PROMPT, steps: int = D.DEFAULT_STEPS,
             size: int = D.BENCH_SIZE, runs: int = D.BENCH_RUNS, console=None) -> dict:
    import torch

    from sprintrt.benchmarks.torch_timing import run_timed
    from sprintrt.engines.build import build_engines
    from sprintrt.export.checkpoint import load_pipeline, make_checkpoint
    from sprintrt.export.onnx_export import export_model
    from sprintrt.export_info import EXPORT_INFO
    from sprintrt.files import model_identity
    from sprintrt.runtime.pipeline import SprintPipeline

    say = console.print if console else print
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, onnx_dir, engine_dir = workdir / "checkpoint-tiny", workdir / "onnx", workdir / "engines"
    if not (ckpt / "model_index.json").exists():
        make_checkpoint(ckpt, "tiny", seed=D.DEFAULT_SEED)
    say(f"[1/4] checkpoint: {ckpt}")
    info_path = onnx_dir / EXPORT_INFO
    if not info_path.exists() or json.loads(info_path.read_text())["model"]["identity"] != model_identity(ckpt):
        # fp32 only: the demo builds ONNX Runtime fp32 engines (`sprintrt export` adds bf16 variants for TensorRT).
        export_model(ckpt, onnx_dir, progress=lambda c: say(f"      exporting + validating {c}"), dtypes=("fp32",))
    say(f"[2/4] ONNX (validated against PyTorch): {onnx_dir}")
    build_engines(onnx_dir, engine_dir, backend=D.DEFAULT_BACKEND, precision="fp32")
    say(f"[3/4] ONNX Runtime engines + manifest: {engine_dir}")

    call = dict(prompt=prompt, num_inference_steps=steps, intermediate_timesteps=D.intermediate_timesteps_for(steps),
                height=size, width=size, use_resolution_binning=False, output_type="np")
    ours = SprintPipeline.from_engines(engine_dir)
    ref = load_pipeline(ckpt)
    ours_runs, ref_runs = [], []
    for i in range(runs + 1):  # run 0 is the warm-up
        out = ours(**call, generator=torch.Generator().manual_seed(0))
        ref_out, ref_t = run_timed(ref, **call, generator=torch.Generator().manual_seed(0))
        if i:
            ours_runs.append(out.timings)
            ref_runs.append(ref_t)
    image, ref_image = out.images, ref_out.images
    from PIL import Image

    png = workdir / "sprintrt.png"
    Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(png)
    say(f"[4/4] image: {png}")

    ours_med, ref_med = median_timings(ours_runs), median_timings(ref_runs)
    result = {
        "prompt": prompt, "steps": steps, "size": size, "runs": runs,
        "sprintrt_onnxruntime_s": ours_med, "diffusers_pytorch_s": ref_med,
        "image_max_abs_diff": max_abs(image, ref_image), "image_psnr_db": psnr(image, ref_image),
    }
    table = [f"| stage (tiny checkpoint, {size}x{size}, {steps} step{'s' if steps > 1 else ''}, median of {runs}) "
             "| sprintrt ORT (ms) | diffusers PyTorch (ms) | speed-up |", "|---|---:|---:|---:|"]
    for label, _ in ROWS:
        a, b = ours_med[label] * 1e3, ref_med[label] * 1e3
        table.append(f"| {label} | {a:.1f} | {b:.1f} | {b / a if a else float('nan'):.2f}x |")
    table.append(f"\nimage vs diffusers: max |diff| {result['image_max_abs_diff']:.2e}, PSNR {result['image_psnr_db']:.1f} dB")
    text = "\n".join(table)
    print(text)  # plain print: a rich console would wrap the Markdown rows
    (workdir / "latency.md").write_text(text + "\n")
    (workdir / "latency.json").write_text(json.dumps(result, indent=1))
    say(f"latency table written to {workdir / 'latency.md'} and {workdir / 'latency.json'}")
    return result
