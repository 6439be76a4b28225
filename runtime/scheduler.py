"""NumPy TrigFlow (sCM) scheduler: timesteps bit-exact with diffusers' SCMScheduler, and the step math.

docs/SANA_SPRINT_SPEC.md §2 and §4. Every array is float32 and every operation runs in the order diffusers runs it, so
with the same model outputs and noise the latents are bit-identical to the PyTorch pipeline's.
The noise is an input (`step(..., noise)`): the caller draws it, so a torch generator can be
replayed exactly while this module stays free of torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sprintrt.defaults import DEFAULT_INTERMEDIATE_TIMESTEPS, DEFAULT_MAX_TIMESTEPS, INTERMEDIATE_STEPS
from sprintrt.errors import invalid

F32 = np.float32
NUM_TRAIN_TIMESTEPS = 1000


def sin32(t: np.float32) -> np.float32:
    # np.sin on float32 is 1 ulp off torch's CPU sinf at t=1.3 and t=1.1781; float64 then rounding
    # matched torch on every schedule value (docs/SANA_SPRINT_SPEC.md §4.5).
    return F32(math.sin(float(t)))


def cos32(t: np.float32) -> np.float32:
    return F32(math.cos(float(t)))


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32, bit-exact: the first half counts up from start,
    the second half counts down from end, both with the float32 step (end - start) / (steps - 1)."""
    start32, end32 = F32(start), F32(end)
    if steps == 1:
        return np.array([start32], dtype=F32)
    step = (end32 - start32) / F32(steps - 1)
    out = np.empty(steps, dtype=F32)
    half = steps // 2
    for i in range(steps):
        out[i] = start32 + F32(i) * step if i < half else end32 - F32(steps - 1 - i) * step
    return out


def trigflow_timesteps(num_inference_steps: int, timesteps=None, max_timesteps: float | None = DEFAULT_MAX_TIMESTEPS,
                       intermediate_timesteps: float | None = DEFAULT_INTERMEDIATE_TIMESTEPS) -> np.ndarray:
    """The n+1 TrigFlow angles of SCMScheduler.set_timesteps, float32. The loop runs over [:-1]."""
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= NUM_TRAIN_TIMESTEPS:
        raise invalid("num_inference_steps", n, f"an integer in [1, {NUM_TRAIN_TIMESTEPS}]", "pass e.g. 1, 2 or 4")
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.float64)
        if ts.ndim != 1 or len(ts) != n + 1:
            raise invalid("timesteps", list(np.ravel(ts)), f"{n + 1} values (num_inference_steps + 1)",
                          "pass one more timestep than steps, ending in 0")
        if max_timesteps is not None:
            raise invalid("max_timesteps", max_timesteps, "None when custom timesteps are given",
                          "pass max_timesteps=None together with timesteps")
        if not np.all(np.isfinite(ts)) or np.any(np.diff(ts) > 0):
            raise invalid("timesteps", ts.tolist(), "finite, non-increasing angles", "sort them from max to 0")
        return ts.astype(F32)
    if max_timesteps is None:
        raise invalid("max_timesteps", None, "a float angle (default 1.5708) when no timesteps are given",
                      "pass max_timesteps or timesteps")
    if not math.isfinite(max_timesteps) or not 0 < max_timesteps <= math.pi / 2 + 1e-3:
        raise invalid("max_timesteps", max_timesteps, "a TrigFlow angle in (0, pi/2]", "use the default 1.5708")
    if intermediate_timesteps is not None:
        if n != INTERMEDIATE_STEPS:
            raise invalid("intermediate_timesteps", intermediate_timesteps,
                          f"None unless num_inference_steps == {INTERMEDIATE_STEPS}",
                          "pass intermediate_timesteps=None for 1, 3 or more steps")
        if not math.isfinite(intermediate_timesteps) or not 0 < intermediate_timesteps < max_timesteps:
            raise invalid("intermediate_timesteps", intermediate_timesteps, f"an angle in (0, {max_timesteps})",
                          "use the default 1.3")
        return np.array([max_timesteps, intermediate_timesteps, 0], dtype=F32)
    return torch_linspace_f32(max_timesteps, 0.0, n + 1)


@dataclass(frozen=True)
class TrigFlowStep:
    """The float32 constants of one step from angle t to t_next (docs/SANA_SPRINT_SPEC.md §4.5)."""

    t: np.float32
    t_next: np.float32
    sflow: np.float32  # flow-matching time fed to the transformer, sin t / (cos t + sin t)
    cin: np.float32  # sqrt(sflow² + (1 - sflow)²) = 1 / (cos t + sin t)

    @classmethod
    def at(cls, t, t_next) -> "TrigFlowStep":
        t, t_next = F32(t), F32(t_next)
        s = sin32(t) / (cos32(t) + sin32(t))
        return cls(t, t_next, s, np.sqrt(s ** 2 + (F32(1) - s) ** 2))


class SCMScheduler:
    """NumPy counterpart of diffusers.SCMScheduler with the pipeline's per-step conversions."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = F32(sigma_data)
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: int, timesteps=None, max_timesteps=DEFAULT_MAX_TIMESTEPS,
                      intermediate_timesteps=DEFAULT_INTERMEDIATE_TIMESTEPS) -> np.ndarray:
        self.timesteps = trigflow_timesteps(num_inference_steps, timesteps, max_timesteps, intermediate_timesteps)
        return self.timesteps

    def steps(self) -> list[TrigFlowStep]:
        ts = self.timesteps
        return [TrigFlowStep.at(ts[i], ts[i + 1]) for i in range(len(ts) - 1)]

    def model_input(self, x: np.ndarray, step: TrigFlowStep) -> np.ndarray:
        """x_in = (x / σd) · cin: what the transformer sees (before its dtype cast)."""
        return (x / self.sigma_data) * step.cin

    def step(self, x: np.ndarray, x_in: np.ndarray, flow: np.ndarray, step: TrigFlowStep,
             noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One TrigFlow step from the transformer's flow prediction. Returns (x_next, x0).

        `noise` is unit normal with x's shape; diffusers draws it on every step, the last included.
        """
        s = step.sflow
        a = F32(1) - F32(2) * s
        b = F32(1) - F32(2) * s + F32(2) * s ** 2
        f_trig = (a * x_in + b * flow.astype(F32)) / step.cin
        f_trig = f_trig * self.sigma_data
        x0 = cos32(step.t) * x - sin32(step.t) * f_trig
        x_next = cos32(step.t_next) * x0 + sin32(step.t_next) * (noise.astype(F32) * self.sigma_data)
        return x_next, x0
