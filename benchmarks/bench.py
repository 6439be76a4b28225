"""`sprintrt bench`: latency, memory and image agreement of sprintrt engines against PyTorch baselines.

Honest by construction: one process, one checkpoint, the same prompt, sizes and torch noise for every
system; warm-up runs, then timed runs (min / median / p90); the diffusers baselines (eager fp32 and
bf16) timed in the same process; every image compared with the diffusers fp32 image.

Results are JSON (schema SCHEMA, tagged with the machine, library versions and engine keys);
`report(json) ` turns a stored JSON into Markdown and a PNG chart.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sprintrt import defaults as D
from sprintrt.engines.backend import ALIASES, BACKENDS, canonical
from sprintrt.errors import InvalidInputError
from sprintrt.export.specs import COMPONENTS
from sprintrt.metrics import max_abs, psnr

SCHEMA = "sprintrt-bench/1"
ENGINE_STAGES = COMPONENTS
STAGES = ("tokenize", "text_encoder", "preprocess", "vae_encoder", "transformer", "scheduler", "noise", "vae_decoder",
          "postprocess")
# optimum-intel: OVSanaSprintPipeline, run by benchmarks/optimum_intel.py in its own environment (--optimum-python)
OPTIMUM = "optimum-intel"
BASELINES = ("torch-fp32", "torch-bf16", "torch-compile-bf16", OPTIMUM)
REFERENCE = "torch-fp32"
TORCH_DEVICES = ("cpu", "cuda")
AUTO = "auto"


class SystemFailed(RuntimeError):
    """A system other than the reference could not be timed (its process was killed, the optimum-intel
    environment failed): the benchmark reports it under `failed` and keeps every other system's numbers."""


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str

    @property
    def name(self) -> str:
        return f"sprintrt {self.backend} {self.precision}"

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        backend, _, precision = text.partition(":")
        if backend == AUTO:  # `build --backend auto`: the tuned per-component choice of this CPU
            return cls(AUTO, "tuned")
        try:
            backend = canonical(backend)
        except InvalidInputError:
            raise InvalidInputError(f"candidate {text!r} names backend {backend!r}: expected one of {list(BACKENDS)} "
                                    f"(or {', '.join(ALIASES)}). Fix: e.g. --candidates ort:fp32,ov:bf16,trt:bf16") from None
        return cls(backend, precision or "fp32")


@dataclass
class BenchConfig:
    model: str | None = None  # checkpoint dir or hub id; None with arch → a seeded random checkpoint
    arch: str | None = "tiny"
    seed: int = 0
    resolutions: list = field(default_factory=lambda: [(512, 512)])  # (height, width)
    batches: list = field(default_factory=lambda: [1])
    steps: list = field(default_factory=lambda: [1])
    candidates: list = field(default_factory=lambda: [Candidate("onnxruntime", "fp32")])
    baselines: list = field(default_factory=lambda: ["torch-fp32", "torch-bf16"])
    warmup: int = 1
    runs: int = 3
    workdir: Path = Path("out/bench")
    prompt: str = D.DEFAULT_PROMPT
    complex_human_instruction: bool = True
    threads: int | None = None
    calibration_count: int = D.DEFAULT_CALIBRATION_COUNT  # int8 candidates: calibration prompts (shipped file)
    vae: str | None = None  # a drop-in AutoencoderDC for every system (export --vae), e.g. DC-AE-Lite
    prompt_cache: bool = False  # also time sprintrt systems on a repeated prompt with the embedding cache
    strength: float | None = None  # image to image from input_picture() at this strength; None: text to image
    optimum_python: str | None = None  # the python of an environment with optimum-intel (the optimum-intel baseline)
    # Where the diffusers baselines run: "cuda" times them on an NVIDIA GPU (the PyTorch row GPU engines are
    # compared with; needs no TensorRT), synchronising the device around every stage.
    torch_device: str = "cpu"

    def check(self) -> None:
        """Refuse nonsense before any work is done."""
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise InvalidInputError(f"runs={self.runs!r} is not allowed: expected an integer >= 1. Fix: --runs 3")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidInputError(f"warmup={self.warmup!r} is not allowed: expected an integer >= 0. Fix: --warmup 1")
        for b in self.baselines:
            if b not in BASELINES:
                raise InvalidInputError(f"baseline {b!r} is not known: expected some of {list(BASELINES)}. "
                                        "Fix: e.g. --baselines torch-fp32,torch-bf16")
        if OPTIMUM in self.baselines and not (self.optimum_python and Path(self.optimum_python).is_file()):
            raise InvalidInputError(f"baseline {OPTIMUM!r} needs --optimum-python, the python of an environment with "
                                    f"optimum-intel (got {self.optimum_python!r}). Fix: see benchmarks/optimum_intel.py")
        if OPTIMUM in self.baselines and (self.strength is not None or self.vae):
            raise InvalidInputError(f"baseline {OPTIMUM!r} runs text to image with the checkpoint's own VAE. Fix: "
                                    "leave out --strength/--vae, or the optimum-intel baseline")
        if REFERENCE not in self.baselines:
            raise InvalidInputError(f"baselines={self.baselines} lack {REFERENCE!r}, the reference every image is "
                                    f"compared with. Fix: add {REFERENCE}")
        for h, w in self.resolutions:
            if h % 32 or w % 32 or h < 32 or w < 32:
                raise InvalidInputError(f"resolution {h}x{w} is not allowed: expected multiples of 32. Fix: e.g. 512 "
                                        "or 768x1280")
        for b in self.batches:
            if not isinstance(b, int) or b < 1:
                raise InvalidInputError(f"batch {b!r} is not allowed: expected an integer >= 1. Fix: --batches 1,2")
        for s in self.steps:
            if not isinstance(s, int) or s < 1:
                raise InvalidInputError(f"steps {s!r} is not allowed: expected an integer >= 1. Fix: --steps 1,2")
        if self.torch_device not in TORCH_DEVICES:
            raise InvalidInputError(f"torch_device={self.torch_device!r} is not allowed: expected one of "
                                    f"{list(TORCH_DEVICES)}. Fix: --torch-device cuda on an NVIDIA machine, else cpu")
        if self.torch_device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise InvalidInputError("torch_device='cuda': this PyTorch sees no CUDA GPU (a CPU-only wheel, or no "
                                        "NVIDIA driver). Fix: install a CUDA build of torch on an NVIDIA machine, or "
                                        "--torch-device cpu")
            if OPTIMUM in self.baselines:
                raise InvalidInputError(f"baseline {OPTIMUM!r} runs on the CPU, not with --torch-device cuda. Fix: "
                                        "benchmark it in a CPU run")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise InvalidInputError(f"strength={self.strength} is not allowed: expected (0, 1] for image to image. "
                                    f"Fix: --strength {D.DEFAULT_STRENGTH}, or leave it out for text to image")


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise InvalidInputError(f"resolution {text!r} is not HEIGHT or HEIGHTxWIDTH. Fix: e.g. 512 or 768x1280") from None
    if len(parts) not in (1, 2):
        raise InvalidInputError(f"resolution {text!r} is not HEIGHT or HEIGHTxWIDTH. Fix: e.g. 512 or 768x1280")
    return (parts[0], parts[-1])


# ---- measurement helpers ----------------------------------------------------------------------

class PeakRss:
    """Samples this process's resident memory every 10 ms while active; `peak` is the largest seen."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def stats(values) -> dict:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(np.ceil(0.9 * len(values))) - 1)]
    return {"min": values[0], "median": statistics.median(values), "p90": p90}


def stage_seconds(timings: dict, stage: str) -> float:
    v = timings.get(stage, 0.0)
    return float(sum(v) if isinstance(v, list) else v)


def summarise(runs: list[dict]) -> dict:
    out = {"stages": {}, "end_to_end": stats([t["total"] for t in runs])}
    for stage in STAGES:
        if any(stage in t for t in runs):
            out["stages"][stage] = stats([stage_seconds(t, stage) for t in runs])
    steps = max((len(t.get("transformer", [])) for t in runs), default=0)
    out["transformer_steps"] = [stats([t["transformer"][i] for t in runs]) for i in range(steps)]
    engine = [sum(stage_seconds(t, s) for s in ENGINE_STAGES) for t in runs]
    overhead = [t["total"] - e for t, e in zip(runs, engine)]
    out["engine_sum"] = stats(engine)
    med_total = out["end_to_end"]["median"]
    out["overhead"] = {"seconds": statistics.median(overhead), "fraction": statistics.median(overhead) / med_total}
    return out


def input_picture(height: int, width: int) -> np.ndarray:
    """The image-to-image input of the benchmark and drift runs: a smooth, deterministic HxWx3 picture in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    picture = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 0.4 + 0.5
    return picture.astype(np.float32)


def steps_run(steps: int, strength: float | None) -> int:
    """Transformer calls of one generation: every step for text to image, fewer for image to image."""
    from sprintrt.runtime.img2img import start_index

    return steps if strength is None else steps - start_index(steps, strength)


# ---- systems under test -------------------------------------------------------------------------

def _torch_system(ckpt: Path, name: str, threads: int | None, vae_dir: Path | None = None, img2img: bool = False,
                  device: str = "cpu"):
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
    if "compile" in name:
        pipe.transformer = torch.compile(pipe.transformer)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)

    def run(call, seed):
        # The noise is drawn on the CPU generator and moved to the device, as diffusers does for a CPU
        # generator: the same noise, and so comparable images, on every device.
        out, timings = run_timed(pipe, **call, generator=torch.Generator().manual_seed(seed))
        return np.asarray(out.images, dtype=np.float32), timings

    return pipe, run


def _sprint_system(engine_dir: Path, threads: int | None, img2img: bool = False):
    import torch

    from sprintrt.runtime.img2img import SprintImg2ImgPipeline
    from sprintrt.runtime.pipeline import SprintPipeline

    pipe = (SprintImg2ImgPipeline if img2img else SprintPipeline).from_engines(engine_dir, threads=threads)

    def run(call, seed):
        out = pipe(**call, generator=torch.Generator().manual_seed(seed))
        return out.images, out.timings

    return pipe, run


def _measure(run, call, warmup: int, runs: int, seed: int, progress):
    for _ in range(warmup):
        run(call, seed)
        progress()
    timings, image = [], None
    for i in range(runs):
        img, t = run(call, seed)
        timings.append(t)
        image = img if image is None else image
        progress()
    return image, timings


def prepare(config: BenchConfig, say=print) -> tuple[Path, Path, dict[Candidate, Path]]:
    """Checkpoint → ONNX → one engine directory per candidate, all cached in the workdir."""
    from sprintrt.engines.build import build_engines
    from sprintrt.export.checkpoint import make_checkpoint
    from sprintrt.export.onnx_export import (export_model, exporter_fingerprint, model_identity, resolve_model,
                                             resolve_vae)
    from sprintrt.export.typed import variant_dtypes

    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if config.model:
        ckpt = resolve_model(config.model)
    else:
        ckpt = work / f"checkpoint-{config.arch}-seed{config.seed}"
        if not (ckpt / "model_index.json").exists():
            say(f"making a seeded random {config.arch} checkpoint in {ckpt}")
            make_checkpoint(ckpt, config.arch, config.seed)
    if not config.candidates:  # baselines only: nothing to export or build
        return ckpt, None, {}
    identity = model_identity(ckpt)
    vae_dir = resolve_vae(config.vae) if config.vae else None
    if vae_dir is not None:  # the ONNX (and engines) of another decoder live apart
        identity = hashlib.sha256((identity + model_identity(vae_dir)).encode()).hexdigest()
    onnx_dir = work / f"onnx-{identity[:12]}"
    info_path = onnx_dir / "export_info.json"
    dtypes = ("fp32", *_variant_dtypes(config.candidates))
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
    for cand in config.candidates:
        engine_dir = work / f"engines-{identity[:12]}-{cand.backend}-{cand.precision}"
        say(f"building {cand.name} engines in {engine_dir}")
        if cand.backend == AUTO:
            from sprintrt.engines.tune import tune_engines

            size = max(max(r) for r in config.resolutions)
            engines[cand] = tune_engines(onnx_dir, engine_dir, count=config.calibration_count, size=size,
                                         progress=lambda msg: say(f"  {msg}"))
        elif cand.precision in ("int8", "fp8"):
            from sprintrt.engines.calibration import build_quantized_engines

            size = max(max(r) for r in config.resolutions)
            engines[cand] = build_quantized_engines(onnx_dir, engine_dir, count=config.calibration_count, size=size,
                                                    progress=lambda msg: say(f"  {msg}"), backend=cand.backend,
                                                    precision=cand.precision)
        else:
            engines[cand] = build_engines(onnx_dir, engine_dir, backend=cand.backend, precision=cand.precision)
        _check_profile(engines[cand], cand, config)
    return ckpt, onnx_dir, engines


def _variant_dtypes(cands) -> list[str]:
    """Typed variants the candidates build from: bf16/fp16 candidates (TensorRT, ONNX Runtime fp16, OpenVINO
    bf16), and for `auto` the 16-bit types this CPU computes in (the tuner's bf16/fp16 candidates)."""
    from sprintrt import machine

    wanted = {c.precision for c in cands if c.precision in ("bf16", "fp16")}
    if any(c.backend == AUTO for c in cands):
        wanted |= {d for d, has in (("bf16", machine.cpu_has_bf16()), ("fp16", machine.cpu_has_fp16())) if has}
    return sorted(wanted)


def _check_profile(engine_dir: Path, cand: Candidate, config: BenchConfig) -> None:
    from sprintrt.engines.manifest import read_manifest

    from sprintrt.export.specs import ModelDims

    manifest = read_manifest(engine_dir)
    f = ModelDims.from_json(manifest.data["model_dims"]).vae_scale_factor
    for comp, entry in manifest.components.items():
        dims = entry["io"]["dims"]
        for h, w in config.resolutions:
            for name, px in (("latent_height", h), ("latent_width", w)):
                if name in dims and not dims[name]["min"] <= px // f <= dims[name]["max"]:
                    lo, hi = dims[name]["min"] * f, dims[name]["max"] * f
                    raise InvalidInputError(f"resolution {h}x{w} is outside the {cand.name} {comp} engine's profile "
                                            f"({name.split('_')[1]} {lo}..{hi} px). Fix: benchmark inside it or "
                                            "rebuild the engines with a wider profile")
        for b in config.batches:
            if "batch" in dims and not dims["batch"]["min"] <= b <= dims["batch"]["max"]:
                raise InvalidInputError(f"batch {b} is outside the {cand.name} {comp} engine's profile "
                                        f"({dims['batch']['min']}..{dims['batch']['max']}). Fix: smaller --batches")


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


def _run_isolated(system, kind: str, ckpt: Path, engines: dict, shapes: list, config: BenchConfig, chi) -> list[dict]:
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
            name = system if kind == "baseline" else system.name
            raise SystemFailed(f"{name}'s process died before reporting (most likely killed for memory: "
                               "run fewer or smaller shapes, or this system on a larger machine)") from None


def _optimum_entries(ckpt: Path, shapes: list, config: BenchConfig, chi) -> list[dict]:
    """The optimum-intel baseline: benchmarks/optimum_intel.py in its own environment, one process per shape
    (its export is made once, in the work directory)."""
    import subprocess
    import tempfile

    script = Path(__file__).with_name("optimum_intel.py")
    ov_dir = Path(config.workdir) / f"optimum-ov-{Path(ckpt).name}"
    entries = []
    for (h, w), batch, steps in shapes:
        call = dict(prompt=[config.prompt] * batch, num_inference_steps=steps,
                    intermediate_timesteps=D.intermediate_timesteps_for(steps), height=h, width=w,
                    use_resolution_binning=False, output_type="np", complex_human_instruction=chi)
        with tempfile.TemporaryDirectory() as tmp:
            image_path = Path(tmp) / "image.npy"
            cmd = [config.optimum_python, str(script), "--model", str(ckpt), "--ov-dir", str(ov_dir), "--call",
                   json.dumps(call), "--seed", str(config.seed), "--warmup", str(config.warmup), "--runs",
                   str(config.runs), "--image", str(image_path)]
            if config.threads:
                cmd += ["--threads", str(config.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                how = (f"was killed by signal {-r.returncode} (9: most likely out of memory; optimum-intel's exporter "
                       "holds the whole pipeline and its traced graphs: more than 24 GB at the real 0.6B size)" if r.returncode < 0 else f"exited with {r.returncode}")
                raise SystemFailed(f"the {OPTIMUM} baseline {how}: {' '.join(cmd[:2])}\n{r.stderr.strip()[-1500:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            image = np.load(image_path)
        entries.append({"name": OPTIMUM, "kind": "baseline", **summarise(res["runs"]), "_image": image,
                        "backend": "openvino (optimum-intel)", "precision": "OpenVINO's CPU default",
                        "peak_rss_gb": round(res["peak_rss_gb"], 2), "load_seconds": round(res["load_seconds"], 2),
                        "versions": res["versions"]})
    return entries


def _system_worker(system, kind: str, ckpt: Path, engines: dict, shapes: list, config: BenchConfig, chi) -> list[dict]:
    from sprintrt.engines.manifest import engine_files, read_manifest
    from sprintrt.export.onnx_export import resolve_vae
    from sprintrt.quiet import quiet_libraries

    quiet_libraries()
    name = system if kind == "baseline" else system.name
    entries = []
    with PeakRss() as mem:
        t0 = time.perf_counter()
        if kind == "baseline":
            vae_dir = resolve_vae(config.vae) if config.vae else None
            pipe, run = _torch_system(ckpt, system, config.threads, vae_dir, img2img=config.strength is not None,
                                      device=config.torch_device)
        else:
            pipe, run = _sprint_system(engines[system], config.threads, img2img=config.strength is not None)
        load_seconds = time.perf_counter() - t0
        for (h, w), batch, steps in shapes:
            call = dict(prompt=[config.prompt] * batch, num_inference_steps=steps,
                        intermediate_timesteps=D.intermediate_timesteps_for(steps), height=h, width=w,
                        use_resolution_binning=False, output_type="np", complex_human_instruction=chi)
            if config.strength is not None:
                call.update(image=input_picture(h, w), strength=config.strength)
            image, timings = _measure(run, call, config.warmup, config.runs, config.seed, lambda: None)
            entry = {"name": name, "kind": kind, **summarise(timings), "_image": image}
            if config.prompt_cache and kind == "candidate":
                entry["cached_prompt"] = _cached_prompt_timings(pipe, run, call, config)
            if kind == "baseline":
                entry.update(backend="pytorch", precision="bf16" if "bf16" in system else "fp32",
                             device=config.torch_device)
            else:
                m = read_manifest(engines[system])
                if system.backend == AUTO:
                    entry["tuned"] = {c: f"{e['backend']}:{e['precision']}" for c, e in m.components.items()}
                entry.update(backend=system.backend, precision=system.precision, engine_dir=str(engines[system]),
                             engine_keys={c: e["key"] for c, e in m.components.items()},
                             engine_bytes={c: sum(f["bytes"] for f in engine_files(e)) for c, e in m.components.items()})
            entries.append(entry)
    gpu_gb = _gpu_memory_used_gb() if kind == "candidate" and system.backend == "tensorrt" else None
    torch_gpu_gb = _torch_gpu_peak_gb() if kind == "baseline" and config.torch_device == "cuda" else None
    for entry in entries:
        entry.update(peak_rss_gb=round(mem.peak / 2**30, 2), load_seconds=round(load_seconds, 2))
        if gpu_gb is not None:
            entry["gpu_memory_used_gb"] = gpu_gb
        if torch_gpu_gb is not None:
            entry["gpu_memory_peak_gb"] = torch_gpu_gb
    return entries


def run_bench(config: BenchConfig, say=print) -> dict:
    """Run the benchmark; returns the results document (see SCHEMA)."""
    from rich.progress import Progress

    from sprintrt.export.specs import DEFAULT_COMPLEX_HUMAN_INSTRUCTION

    config.check()
    ckpt, onnx_dir, engines = prepare(config, say)
    model, onnx_bytes = _model_facts(ckpt, onnx_dir, config)
    chi = list(DEFAULT_COMPLEX_HUMAN_INSTRUCTION) if config.complex_human_instruction else None
    systems = [(b, "baseline") for b in config.baselines] + [(c, "candidate") for c in config.candidates]
    shapes = [(r, b, s) for r in config.resolutions for b in config.batches for s in config.steps]
    results = {(r, b, s): [] for r, b, s in shapes}
    failed = []
    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=len(systems))
        for system, kind in systems:
            name = system if kind == "baseline" else system.name
            bar.update(task, description=f"{name}: {len(shapes)} shapes x ({config.warmup} warm-up + {config.runs} runs)")
            try:
                entries = _run_isolated(system, kind, ckpt, engines, shapes, config, chi)
            except SystemFailed as e:
                if name == REFERENCE:  # nothing to compare the others with
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
                     "reference": REFERENCE, "binning": False, "strength": config.strength,
                     "torch_device": config.torch_device},
        "onnx_bytes": onnx_bytes,
        "results": [],
        "failed": failed,
    }
    for ((h, w), batch, steps), entries in results.items():
        ref = next(e["_image"] for e in entries if e["name"] == REFERENCE)
        for e in entries:
            img = e.pop("_image")
            e["image_vs_reference"] = {"max_abs": max_abs(img, ref), "psnr_db": psnr(img, ref)}
        doc["results"].append({"height": h, "width": w, "batch": batch, "steps": steps,
                               "steps_run": steps_run(steps, config.strength), "systems": entries})
    validate(doc)
    return doc


def _gpu_memory_used_gb() -> float | None:
    """Device memory in use (cudaMemGetInfo: total - free) while the TensorRT engines are loaded.

    TensorRT stage times need no CUDA events here: every engine call synchronises its stream before
    returning, so the host clock around it measures the GPU work."""
    import ctypes

    try:
        from polygraphy import cuda

        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        cuda.wrapper().check(cuda.wrapper().handle.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)))
        return round((total.value - free.value) / 2**30, 2)
    except Exception:  # no CUDA runtime: nothing to report
        return None


def _model_facts(ckpt: Path, onnx_dir: Path | None, config: BenchConfig) -> tuple[dict, dict]:
    """({identity, chi_tokens}, {component: ONNX bytes}) from the export, or from the checkpoint's configs
    when nothing was exported (a baselines-only run)."""
    if onnx_dir is not None:
        info = json.loads((onnx_dir / "export_info.json").read_text())
        return ({"identity": info["model"]["identity"], "chi_tokens": info["model_dims"]["chi_tokens"]},
                {c: r["bytes"] + (r.get("external_data") or {}).get("bytes", 0) for c, r in info["components"].items()})
    from sprintrt.export.onnx_export import model_facts, model_identity, resolve_vae

    vae_dir = resolve_vae(config.vae) if config.vae else None
    identity = model_identity(ckpt)
    if vae_dir is not None:
        identity = hashlib.sha256((identity + model_identity(vae_dir)).encode()).hexdigest()
    return {"identity": identity, "chi_tokens": model_facts(ckpt, vae_dir)[0].chi_tokens}, {}


def _torch_gpu_peak_gb() -> float:
    """The most GPU memory PyTorch's allocator held in this process (weights, activations, workspaces)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


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


# ---- schema, report, plot -------------------------------------------------------------------------

_STATS = {"min", "median", "p90"}


def validate(doc: dict) -> None:
    """Raise ValueError naming the first field that breaks the schema."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"benchmark JSON does not follow {SCHEMA}: {what}")

    need(doc.get("schema") == SCHEMA, f"schema is {doc.get('schema')!r}")
    for key in ("created", "machine", "versions", "model", "settings", "onnx_bytes", "results"):
        need(key in doc, f"missing '{key}'")
    need(doc["results"], "no results")
    for r in doc["results"]:
        for key in ("height", "width", "batch", "steps", "systems"):
            need(key in r, f"result lacks '{key}'")
        need(sum(s["name"] == doc["settings"]["reference"] for s in r["systems"]) == 1, "reference system missing")
        for s in r["systems"]:
            for key in ("name", "kind", "backend", "precision", "stages", "end_to_end", "engine_sum", "overhead",
                        "transformer_steps", "peak_rss_gb", "image_vs_reference"):
                need(key in s, f"system {s.get('name')!r} lacks '{key}'")
            need(set(s["end_to_end"]) == _STATS, f"{s['name']} end_to_end needs {sorted(_STATS)}")
            need(all(set(v) == _STATS for v in s["stages"].values()), f"{s['name']} stage stats")
            ran = r.get("steps_run", r["steps"])
            need(len(s["transformer_steps"]) == ran, f"{s['name']} has {len(s['transformer_steps'])} step timings, not {ran}")
            need(s["engine_sum"]["median"] <= s["end_to_end"]["median"] * 1.001, f"{s['name']} stages exceed end to end")
    for f in doc.get("failed", []):
        need(set(f) == {"name", "kind", "error"}, f"failed system entry {f!r} needs name, kind and error")


def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def report(doc: dict) -> str:
    """Markdown tables, one per (resolution, batch, steps)."""
    validate(doc)
    m, st = doc["machine"], doc["settings"]
    task = "text to image" if st.get("strength") is None else f"image to image, strength {st['strength']}"
    lines = [f"# sprintrt benchmark — {doc['model']['source']} ({task})", "",
             f"Machine: {m['cpu']['name']} ({m['cores']} cores, {m['memory_gb']} GB"
             f"{', ' + ', '.join(g['name'] for g in m['gpus']) if m['gpus'] else ', no GPU'}); "
             f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items())}.",
             f"Median of {st['runs']} runs after {st['warmup']} warm-up; text length {st['text_length']} "
             f"({'with' if st['complex_human_instruction'] else 'without'} the complex human instruction"
             f"{'; sprintrt runs the text encoder over the prompt after the instruction, whose cached prefix the warm-up computed' if st['complex_human_instruction'] else ''}); "
             f"images compared with {st['reference']}. Created {doc['created']}.", ""]
    for r in doc["results"]:
        lines += [f"## {r['height']}x{r['width']}, batch {r['batch']}, {r['steps']} step{'s' if r['steps'] > 1 else ''}",
                  "", "| system | end to end s (min / median / p90) | text encoder s | transformer s | VAE decoder s "
                  "| overhead | speed-up vs fp32 | peak RSS GB | PSNR dB | max abs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ref = next(s for s in r["systems"] if s["name"] == st["reference"])["end_to_end"]["median"]
        for s in r["systems"]:
            e, g = s["end_to_end"], s["stages"].get
            q = s["image_vs_reference"]
            ps = "identical" if q["psnr_db"] == float("inf") else f"{q['psnr_db']:.1f}"
            where = f" ({s['device']})" if s.get("device", "cpu") != "cpu" else ""
            lines.append(
                f"| {s['name']}{where} | {_fmt_s(e['min'])} / **{_fmt_s(e['median'])}** / {_fmt_s(e['p90'])} | "
                f"{_fmt_s(g('text_encoder', {'median': 0})['median'])} | {_fmt_s(g('transformer', {'median': 0})['median'])} | "
                f"{_fmt_s(g('vae_decoder', {'median': 0})['median'])} | {100 * s['overhead']['fraction']:.1f}% | "
                f"{ref / e['median']:.2f}x | {s['peak_rss_gb']} | {ps} | {q['max_abs']:.2g} |")
        on_gpu = [(s["name"], s.get("gpu_memory_peak_gb", s.get("gpu_memory_used_gb"))) for s in r["systems"]
                  if "gpu_memory_peak_gb" in s or "gpu_memory_used_gb" in s]
        if on_gpu:
            lines += ["", "GPU memory (PyTorch: its allocator's peak; TensorRT: in use with the engines loaded): "
                      + ", ".join(f"{n} {gb} GB" for n, gb in on_gpu)]
        cached = [s for s in r["systems"] if "cached_prompt" in s]
        if cached:
            lines += ["", "Repeated prompt, with the prompt-embedding cache (`from_engines(prompt_cache=...)`), apart from "
                      "the cold-prompt numbers above:", "", "| system | end to end s (median) | text encoder s |",
                      "|---|---:|---:|"]
            lines += [f"| {s['name']} | {_fmt_s(s['cached_prompt']['end_to_end']['median'])} | "
                      f"{_fmt_s(s['cached_prompt']['text_encoder']['median'])} |" for s in cached]
        lines.append("")
    for f in doc.get("failed", []):
        lines += [f"**Not measured: {f['name']}** ({f['kind']}): {f['error'].splitlines()[0]}", ""]
    lines.append("Overhead = end to end − the engines (text encoder, transformer, VAE decoder and, image to image, "
                 "VAE encoder): tokenizing, scheduling, noise, pre- and post-processing and the runtime itself. Each "
                 "system is loaded and timed in a fresh process, one after another; peak RSS is that process's "
                 "largest resident set.")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str | Path) -> Path:
    """Stacked horizontal bars of median stage times, one panel per (resolution, batch, steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate(doc)
    n = len(doc["results"])
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 0.55 * max(len(r["systems"]) for r in doc["results"])) if n == 1
                             else (9, 2.5 * n), squeeze=False)
    colours = {"text_encoder": "#4c72b0", "transformer": "#dd8452", "vae_decoder": "#55a868", "other": "#b0b0b0"}
    for ax, r in zip(axes[:, 0], doc["results"]):
        names = [s["name"] for s in r["systems"]]
        left = np.zeros(len(names))
        for stage in ("text_encoder", "transformer", "vae_decoder", "other"):
            if stage == "other":
                vals = np.array([s["end_to_end"]["median"] for s in r["systems"]]) - left
            else:
                vals = np.array([s["stages"].get(stage, {"median": 0})["median"] for s in r["systems"]])
            ax.barh(names, vals, left=left, color=colours[stage], label=stage.replace("_", " "))
            left += vals
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median)")
        ax.set_title(f"{r['height']}x{r['width']}, batch {r['batch']}, {r['steps']} step(s)", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if n > 1 else 0.12, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict, json_path: str | Path) -> tuple[Path, Path, Path]:
    from sprintrt.files import write_json_and_markdown

    json_path, md = write_json_and_markdown(doc, json_path, report)
    png = plot(doc, json_path.with_suffix(".png"))
    return json_path, md, png

