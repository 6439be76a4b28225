"""Each pipeline's call is diffusers' call: the same parameter names, in the same order, with the same defaults
(runtime/call.py declares them once). If diffusers changes its signature, or ours drifts, this fails."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from diffusers import SanaSprintImg2ImgPipeline, SanaSprintPipeline

from sprintrt.errors import InvalidInputError
from sprintrt.runtime.img2img import SprintImg2ImgPipeline
from sprintrt.runtime.pipeline import SprintPipeline

PAIRS = [(SprintPipeline.__call__, SanaSprintPipeline.__call__),
         (SprintPipeline.check_arguments, SanaSprintPipeline.__call__),
         (SprintImg2ImgPipeline.__call__, SanaSprintImg2ImgPipeline.__call__),
         (SprintImg2ImgPipeline.check_arguments, SanaSprintImg2ImgPipeline.__call__)]


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=lambda fn: fn.__qualname__)
def test_names_order_and_defaults_are_diffusers(ours, theirs):
    mine, diffusers = _params(ours), _params(theirs)
    assert [n for n, _ in mine] == [n for n, _ in diffusers]
    for (name, default), (_, expected) in zip(mine, diffusers):
        assert default == expected, f"{name}: {default!r} here, {expected!r} in diffusers"


def test_the_declared_signature_binds_calls_as_python_does(sprint_pipe):
    with pytest.raises(TypeError, match="seed"):
        sprint_pipe("a cat", seed=3)  # a typo is an error, not a silently ignored argument
    with pytest.raises(TypeError, match="multiple values"):
        sprint_pipe("a cat", prompt="a dog")
    out = sprint_pipe("a cat", 1, None, 1.5708, None, output_type="latent", height=64, width=64,
                      use_resolution_binning=False, generator=0)  # positional, in diffusers' order
    assert out.images.shape == (1, 32, 2, 2)


def test_callback_on_step_end_sees_and_replaces_latents(sprint_pipe):
    """diffusers' callback contract with NumPy arrays: called after every step with the step index, the angle and
    the asked-for arrays; what it returns replaces the pipeline's, and `_interrupt` skips the remaining steps."""
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t), sorted(kwargs), kwargs["latents"].shape))
        return {"latents": np.zeros_like(kwargs["latents"])}

    call = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, use_resolution_binning=False, generator=0,
                output_type="latent")
    plain = sprint_pipe(**call).images
    zeroed = sprint_pipe(**call, callback_on_step_end=callback,
                         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    assert [(i, round(t, 4)) for i, t, _, _ in seen] == [(0, 1.5708), (1, 1.3)]
    assert seen[0][2] == ["latents", "prompt_embeds"] and seen[0][3] == (1, 32, 2, 2)
    assert not np.allclose(plain, zeroed)  # the second step started from the callback's zeros

    def stop(pipe, i, t, kwargs):
        pipe._interrupt = True
        return {}

    seen.clear()
    one_step = sprint_pipe(**call, callback_on_step_end=stop).images
    first_only = sprint_pipe(**dict(call, num_inference_steps=1, intermediate_timesteps=None)).images
    assert np.array_equal(one_step, first_only) and sprint_pipe.interrupt is False  # reset by every call


@pytest.mark.parametrize("kw,match", [
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(callback_on_step_end=3), "callback_on_step_end=3"),
    (dict(attention_kwargs="scale"), "attention_kwargs"),  # a dict is accepted (test_bad_input.py), not this
])
def test_call_extensions_engines_cannot_honour_are_refused(sprint_pipe, kw, match):
    with pytest.raises(InvalidInputError, match=match):
        sprint_pipe("a cat", height=64, width=64, use_resolution_binning=False, output_type="latent", **kw)
