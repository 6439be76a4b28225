"""The peer a CPU user would pick: optimum-intel's OVSanaSprintPipeline, timed as a `sprintrt bench` baseline.

optimum-intel pins older transformers than sprintrt's export uses, so it lives in an environment of its
own and this file runs there as a script (it imports neither sprintrt nor anything optimum-intel lacks):

    python -m venv optimum-venv
    optimum-venv/bin/pip install torch==2.13.0 "optimum-intel[openvino,diffusers]==2.2.0" "transformers<5.6"
    optimum-venv/bin/pip uninstall -y torchvision   # its PyPI build fails to load beside torch's CPU wheel (torchvision::nms)
    sprintrt bench ... --baselines torch-fp32,optimum-intel --optimum-python optimum-venv/bin/python

It exports the checkpoint once with optimum-intel's own exporter (what `optimum-cli export openvino`
runs; `--export-dtype` loads the checkpoint in bf16 instead of fp32, though at the real 0.6B size neither fits
in 24 GB) into OV_DIR, loads OVSanaSprintPipeline from it (OpenVINO picks its inference precision for the
CPU: bf16 where the CPU has it, fp32 elsewhere), runs the call `warmup + runs` times with the same
seeded torch generator as the diffusers baselines, and prints one JSON line: per timed run the end-to-end seconds
and the text encoder / transformer (per call) / VAE decoder seconds (each OpenVINO sub-model's forward),
load seconds, peak RSS, and where the first image was saved (.npy, float32 in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="diffusers checkpoint directory")
    p.add_argument("--ov-dir", required=True, help="where the OpenVINO export lives (made once)")
    p.add_argument("--call", required=True, help="JSON of the pipeline call (prompt, steps, size, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--image", required=True, help=".npy path for the first timed image")
    p.add_argument("--export-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the torch dtype optimum-intel loads the checkpoint in to export it (float32, as optimum-cli "
                        "does; at the real 0.6B size its exporter was killed on a 24 GB machine either way: at 21 GB "
                        "resident from float32, 23.9 GB from bfloat16)")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from optimum.intel.openvino import OVSanaSprintPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    ov_dir = Path(args.ov_dir)
    t0 = time.perf_counter()
    if not (ov_dir / "model_index.json").is_file():
        OVSanaSprintPipeline.from_pretrained(args.model, export=True, compile=False,
                                             torch_dtype=getattr(torch, args.export_dtype)).save_pretrained(ov_dir)
    export_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = {"INFERENCE_NUM_THREADS": str(args.threads)} if args.threads else None
    pipe = OVSanaSprintPipeline.from_pretrained(ov_dir, ov_config=config)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - t0
    call = json.loads(args.call)
    clock: dict = {}
    for name in ("text_encoder", "transformer", "vae_decoder"):  # per-stage times, as sprintrt reports them
        _time_calls(getattr(pipe, name), name, clock)
    runs, image = [], None
    for i in range(args.warmup + args.runs):
        clock.clear()
        t0 = time.perf_counter()
        out = pipe(**call, generator=torch.Generator().manual_seed(args.seed))
        total = time.perf_counter() - t0
        if i >= args.warmup:
            runs.append({"total": total, "text_encoder": sum(clock.get("text_encoder", [])),
                         "transformer": clock.get("transformer", []), "vae_decoder": sum(clock.get("vae_decoder", []))})
            image = np.asarray(out.images, dtype=np.float32) if image is None else image
    np.save(args.image, image)
    print(json.dumps({"runs": runs, "load_seconds": load_seconds, "export_seconds": export_seconds,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "image": args.image, "versions": _versions()}))
    return 0


def _time_calls(model, name: str, clock: dict) -> None:
    """Record the seconds of every call of an OpenVINO sub-model (its forward) under clock[name]."""
    forward = model.forward

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            clock.setdefault(name, []).append(time.perf_counter() - t0)

    model.forward = timed


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("optimum-intel", "openvino", "torch", "diffusers", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
