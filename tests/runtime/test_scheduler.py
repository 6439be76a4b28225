"""The NumPy TrigFlow scheduler vs diffusers' SCMScheduler: timesteps bit-identical, steps exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SCMScheduler as TorchSCM

from sprintrt.defaults import intermediate_timesteps_for
from sprintrt.errors import InvalidInputError
from sprintrt.runtime.scheduler import SCMScheduler, TrigFlowStep, torch_linspace_f32, trigflow_timesteps


def _torch_timesteps(n, **kw):
    s = TorchSCM(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    s.set_timesteps(n, **kw)
    return s.timesteps.numpy()


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_linspace_timesteps_bit_identical(n):
    ours = trigflow_timesteps(n, intermediate_timesteps=None)
    ref = _torch_timesteps(n, intermediate_timesteps=None)
    assert ours.dtype == np.float32
    assert ours.view(np.uint32).tolist() == ref.view(np.uint32).tolist()


def test_default_two_step_schedule_bit_identical():
    ours = trigflow_timesteps(2)
    assert ours.view(np.uint32).tolist() == _torch_timesteps(2).view(np.uint32).tolist()
    assert ours.view(np.uint32).tolist() == [0x3FC90FF9, 0x3FA66666, 0]  # docs/SANA_SPRINT_SPEC.md §2.3


@pytest.mark.parametrize("custom", [[1.5, 0.9, 0.3, 0.0], [1.2, 0.0]])
def test_custom_timesteps_bit_identical(custom):
    n = len(custom) - 1
    ours = trigflow_timesteps(n, timesteps=custom, max_timesteps=None, intermediate_timesteps=None)
    ref = _torch_timesteps(n, timesteps=custom, max_timesteps=None, intermediate_timesteps=None)
    assert ours.view(np.uint32).tolist() == ref.view(np.uint32).tolist()


@pytest.mark.parametrize("steps", [2, 3, 5, 9, 17, 101])
def test_torch_linspace_emulation(steps):
    ref = torch.linspace(1.5708, 0, steps, dtype=torch.float32).numpy()
    assert torch_linspace_f32(1.5708, 0, steps).view(np.uint32).tolist() == ref.view(np.uint32).tolist()


def test_step_constants_match_spec_table():
    st = TrigFlowStep.at(np.float32(1.5708), np.float32(0))
    assert st.sflow.view(np.uint32) == 0x3F80001F  # 1.0000037, docs/SANA_SPRINT_SPEC.md §4.5
    st = TrigFlowStep.at(np.float32(1.3), np.float32(0))
    assert st.sflow.view(np.uint32) == 0x3F485F8D


@pytest.mark.parametrize("n", [1, 2, 4])
def test_step_matches_diffusers_pipeline_math(n):
    """The conversion before/after the model and SCMScheduler.step, with a fake model output."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((2, 4, 3, 5)) * 0.5).astype(np.float32)
    ref_s = TorchSCM(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    ref_s.set_timesteps(n, intermediate_timesteps=intermediate_timesteps_for(n))
    ref_s.set_begin_index(0)
    ours = SCMScheduler(0.5)
    ours.set_timesteps(n, intermediate_timesteps=intermediate_timesteps_for(n))
    xt = torch.from_numpy(x.copy())
    for i, (t, step) in enumerate(zip(ref_s.timesteps[:-1], ours.steps())):
        flow = rng.standard_normal(x.shape).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        # diffusers' pipeline, verbatim in torch
        ts = t.expand(2)
        s = (torch.sin(ts) / (torch.cos(ts) + torch.sin(ts))).view(-1, 1, 1, 1)
        x_in_t = (xt / 0.5) * torch.sqrt(s ** 2 + (1 - s) ** 2)
        pred = ((1 - 2 * s) * x_in_t + (1 - 2 * s + 2 * s ** 2) * torch.from_numpy(flow)) / torch.sqrt(s ** 2 + (1 - s) ** 2)
        pred = pred.float() * 0.5
        z = torch.from_numpy(noise)
        x0_t = torch.cos(ref_s.timesteps[i]) * xt - torch.sin(ref_s.timesteps[i]) * pred
        xt = torch.cos(ref_s.timesteps[i + 1]) * x0_t + torch.sin(ref_s.timesteps[i + 1]) * (z * 0.5)
        # ours
        x_in = ours.model_input(x, step)
        assert np.array_equal(x_in, x_in_t.numpy())
        x, x0 = ours.step(x, x_in, flow, step, noise)
        assert np.array_equal(x0, x0_t.numpy())
        assert np.array_equal(x, xt.numpy())


@pytest.mark.parametrize("kw,match", [
    (dict(num_inference_steps=0), "num_inference_steps=0"),
    (dict(num_inference_steps=2.5), "num_inference_steps=2.5"),
    (dict(num_inference_steps=4), "intermediate_timesteps=1.3"),
    (dict(num_inference_steps=2, timesteps=[1.0, 0.0]), "timesteps="),
    (dict(num_inference_steps=1, timesteps=[1.0, 0.0]), "max_timesteps="),
    (dict(num_inference_steps=1, max_timesteps=None, intermediate_timesteps=None), "max_timesteps=None"),
    (dict(num_inference_steps=1, max_timesteps=float("nan"), intermediate_timesteps=None), "max_timesteps=nan"),
])
def test_bad_schedules_raise_typed_errors(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        trigflow_timesteps(**kw)
