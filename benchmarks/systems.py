"""The systems a benchmark times, each loaded and timed in a process of its own: diffusers' pipelines
(the baselines), sprintrt's pipelines over built engines (the candidates) and, in another Python
environment, optimum-intel's OpenVINO pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sprintrt import defaults as D
from sprintrt.benchmarks.config import OPTIMUM, BenchConfig, is_auto, system_name
from sprintrt.benchmarks.measure import PeakRss, input_picture, stage_seconds, stats, summarise, timed_runs
from sprintrt.runtime.image import control_picture


class SystemFailed(RuntimeError):
    """A system other than the reference could not be timed (its process was killed, the optimum-intel
    environment failed): the benchmark reports it under `failed` and keeps every other system's numbers."""


def pipeline_call(config: BenchConfig, shape: tuple, chi) -> dict:
    """The pipeline arguments of one benchmarked shape ((height, width), batch, steps), the same for every system."""
    (h, w), batch, steps = shape
    call = dict(prompt=[config.prompt] * batch, num_inference_steps=steps,
                intermediate_timesteps=D.intermediate_timesteps_for(steps), height=h, width=w,
                use_resolution_binning=False, output_type="np", complex_human_instruction=chi)
    if config.strength is not None:
        call.update(image=input_picture(h, w), strength=config.strength)
    if config.controlnet:
        call.update(control_image=control_picture(h, w), controlnet_conditioning_scale=D.DEFAULT_CONTROLNET_SCALE)
    return call


def run_isolated(system, kind: str, ckpt: Path, engines: dict, shapes: list, config: BenchConfig, chi) -> list[dict]:
    """Load and time one system in a fresh process: its timings, peak RSS and memory pressure are its
    own, not shaped by the heap and mapped pages of the systems run before it (measured: OpenVINO bf16
    went from 7.9 s to 9.3 s end to end when run after two ONNX Runtime systems in one process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if system == OPTIMUM:
        return _optimum_entries(ckpt, shapes, config, chi)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_system_worker, system, kind, ckpt, engines, shapes, config, chi).result()
        except BrokenProcessPool:
            raise SystemFailed(f"{system_name(system)}'s process died before reporting (most likely killed for "
                               "memory: run fewer or smaller shapes, or this system on a larger machine)") from None


def _torch_system(ckpt: Path, name: str, threads: int | None, vae_dir: Path | None = None, img2img: bool = False,
                  device: str = "cpu", controlnet: bool = False):
    import torch

    from sprintrt.benchmarks.torch_timing import run_timed
    from sprintrt.export.checkpoint import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    pipe = load_pipeline(ckpt, torch_dtype=dtype)
    if vae_dir is not None:
        from diffusers import AutoencoderDC

        pipe.vae = AutoencoderDC.from_pretrained(vae_dir, torch_dtype=dtype).eval()
    if img2img:
        from diffusers import SanaSprintImg2ImgPipeline

        pipe = SanaSprintImg2ImgPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if controlnet:
        from diffusers import SanaControlNetModel

        from sprintrt.benchmarks.controlnet_reference import SprintControlNetReference
        from sprintrt.export.checkpoint import CONTROLNET_FOLDER

        net = SanaControlNetModel.from_pretrained(Path(ckpt) / CONTROLNET_FOLDER, torch_dtype=dtype).eval().to(device)
        pipe = SprintControlNetReference(pipe, net)
    if "compile" in name:
        pipe.transformer = torch.compile(pipe.transformer)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)

    def run(call, seed):
        # The noise is drawn on the CPU generator and moved to the device, as diffusers does for a CPU
        # generator: the same noise, and so comparable images, on every device.
        out, timings = run_timed(pipe, **call, generator=torch.Generator().manual_seed(seed))
        return np.asarray(out.images, dtype=np.float32), timings

    return pipe, run


def _sprint_system(engine_dir: Path, threads: int | None, img2img: bool = False, controlnet: bool = False):
    import torch

    from sprintrt.runtime.controlnet import SprintControlNetPipeline
    from sprintrt.runtime.img2img import SprintImg2ImgPipeline
    from sprintrt.runtime.pipeline import SprintPipeline

    cls = SprintControlNetPipeline if controlnet else SprintImg2ImgPipeline if img2img else SprintPipeline
    pipe = cls.from_engines(engine_dir, threads=threads)

    def run(call, seed):
        out = pipe(**call, generator=torch.Generator().manual_seed(seed))
        return out.images, out.timings

    return pipe, run


def _cached_prompt_timings(pipe, run, call, config: BenchConfig) -> dict:
    """The same call with the prompt-embedding cache on and the prompt already in it: what a service
    that sees repeated prompts gets. Reported apart from the cold-prompt numbers."""
    from sprintrt.runtime.prompt_cache import PromptEmbeddingCache

    pipe.prompt_cache = PromptEmbeddingCache(8)
    try:
        run(call, config.seed)  # fills the cache
        timings = [run(call, config.seed)[1] for _ in range(config.runs)]
    finally:
        pipe.prompt_cache = None
    return {"end_to_end": stats([t["total"] for t in timings]),
            "text_encoder": stats([stage_seconds(t, "text_encoder") for t in timings])}


def _optimum_entries(ckpt: Path, shapes: list, config: BenchConfig, chi) -> list[dict]:
    """The optimum-intel baseline: benchmarks/optimum_intel.py in its own environment, one process per shape
    (its export is made once, in the work directory)."""
    import subprocess
    import tempfile

    script = Path(__file__).with_name("optimum_intel.py")
    ov_dir = Path(config.workdir) / f"optimum-ov-{Path(ckpt).name}"
    entries = []
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            image_path = Path(tmp) / "image.npy"
            cmd = [config.optimum_python, str(script), "--model", str(ckpt), "--ov-dir", str(ov_dir), "--call",
                   json.dumps(pipeline_call(config, shape, chi)), "--seed", str(config.seed), "--warmup",
                   str(config.warmup), "--runs", str(config.runs), "--image", str(image_path)]
            if config.threads:
                cmd += ["--threads", str(config.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                how = (f"was killed by signal {-r.returncode} (9: most likely out of memory; optimum-intel's exporter "
                       "holds the whole pipeline and its traced graphs: more than 24 GB at the real 0.6B size)"
                       if r.returncode < 0 else f"exited with {r.returncode}")
                raise SystemFailed(f"the {OPTIMUM} baseline {how}: {' '.join(cmd[:2])}\n{r.stderr.strip()[-1500:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            image = np.load(image_path)
        entries.append({"name": OPTIMUM, "kind": "baseline", **summarise(res["runs"]), "_image": image,
                        "backend": "openvino (optimum-intel)", "precision": "OpenVINO's CPU default",
                        "peak_rss_gb": round(res["peak_rss_gb"], 2), "load_seconds": round(res["load_seconds"], 2),
                        "versions": res["versions"]})
    return entries


def _system_worker(system, kind: str, ckpt: Path, engines: dict, shapes: list, config: BenchConfig, chi) -> list[dict]:
    from sprintrt.export.onnx_export import resolve_vae
    from sprintrt.manifest import engine_files, read_manifest
    from sprintrt.quiet import quiet_libraries

    quiet_libraries()
    entries, on_gpu = [], False
    with PeakRss() as mem:
        t0 = time.perf_counter()
        if kind == "baseline":
            vae_dir = resolve_vae(config.vae) if config.vae else None
            pipe, run = _torch_system(ckpt, system, config.threads, vae_dir, img2img=config.strength is not None,
                                      device=config.torch_device, controlnet=config.controlnet)
        else:
            pipe, run = _sprint_system(engines[system], config.threads, img2img=config.strength is not None,
                                       controlnet=config.controlnet)
        load_seconds = time.perf_counter() - t0
        for shape in shapes:
            call = pipeline_call(config, shape, chi)
            image, timings = timed_runs(run, call, config.warmup, config.runs, config.seed)
            entry = {"name": system_name(system), "kind": kind, **summarise(timings), "_image": image}
            if config.prompt_cache and kind == "candidate":
                entry["cached_prompt"] = _cached_prompt_timings(pipe, run, call, config)
            if kind == "baseline":
                entry.update(backend="pytorch", precision="bf16" if "bf16" in system else "fp32",
                             device=config.torch_device)
            else:
                m = read_manifest(engines[system])
                if is_auto(system):
                    entry["tuned"] = {c: f"{e['backend']}:{e['precision']}" for c, e in m.components.items()}
                entry.update(backend=system.backend, precision="tuned" if system.precision is None else
                             system.precision.value, engine_dir=str(engines[system]),
                             engine_keys={c: e["key"] for c, e in m.components.items()},
                             engine_bytes={c: sum(f["bytes"] for f in engine_files(e)) for c, e in m.components.items()})
                on_gpu = any(e["target"]["kind"] != "cpu" for e in m.components.values())
            entries.append(entry)
    gpu_gb = _gpu_memory_used_gb() if on_gpu else None
    torch_gpu_gb = _torch_gpu_peak_gb() if kind == "baseline" and config.torch_device == "cuda" else None
    for entry in entries:
        entry.update(peak_rss_gb=round(mem.peak / 2**30, 2), load_seconds=round(load_seconds, 2))
        if gpu_gb is not None:
            entry["gpu_memory_used_gb"] = gpu_gb
        if torch_gpu_gb is not None:
            entry["gpu_memory_peak_gb"] = torch_gpu_gb
    return entries


def _gpu_memory_used_gb() -> float | None:
    """Device memory in use (cudaMemGetInfo: total - free) while GPU engines are loaded.

    GPU engine stage times need no CUDA events here: every engine call synchronises its stream before
    returning, so the host clock around it measures the GPU work."""
    import ctypes

    try:
        from polygraphy import cuda

        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        cuda.wrapper().check(cuda.wrapper().handle.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)))
        return round((total.value - free.value) / 2**30, 2)
    except Exception:  # no CUDA runtime: nothing to report
        return None


def _torch_gpu_peak_gb() -> float:
    """The most GPU memory PyTorch's allocator held in this process (weights, activations, workspaces)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)
