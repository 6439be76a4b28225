"""How a system is measured: timed runs after warm-ups, per-stage statistics, peak resident memory, and
the fixed input picture of image-to-image runs. Shared by the benchmark, drift and the demo."""

from __future__ import annotations

import statistics
import threading

import numpy as np

from sprintrt.specs import COMPONENTS

# The stages a pipeline's timings name (SprintPipelineOutput.timings and the diffusers hooks alike); the
# engine stages are the components.
STAGES = ("tokenize", "text_encoder", "preprocess", "vae_encoder", "controlnet", "transformer", "scheduler", "noise",
          "vae_decoder", "postprocess")
ENGINE_STAGES = COMPONENTS


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
    """A stage's seconds in one run's timings (per-step stages summed over the steps)."""
    v = timings.get(stage, 0.0)
    return float(sum(v) if isinstance(v, list) else v)


def summarise(runs: list[dict]) -> dict:
    """Statistics of timed runs: end to end, per stage, per transformer step, the engines and the rest."""
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


def timed_runs(run, call: dict, warmup: int, runs: int, seed: int) -> tuple[object, list[dict]]:
    """(the first timed run's images, every timed run's timings) of `run(call, seed)` after `warmup` runs."""
    for _ in range(warmup):
        run(call, seed)
    timings, image = [], None
    for _ in range(runs):
        img, t = run(call, seed)
        timings.append(t)
        image = img if image is None else image
    return image, timings


def input_picture(height: int, width: int) -> np.ndarray:
    """The image-to-image input of the benchmark and drift runs: a smooth, deterministic HxWx3 picture in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    picture = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 0.4 + 0.5
    return picture.astype(np.float32)


def steps_run(steps: int, strength: float | None) -> int:
    """Transformer calls of one generation: every step for text to image, fewer for image to image."""
    from sprintrt.runtime.img2img import start_index

    return steps if strength is None else steps - start_index(steps, strength)
