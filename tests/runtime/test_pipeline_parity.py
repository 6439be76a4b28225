"""SprintPipeline over ONNX Runtime vs diffusers' SanaSprintPipeline on the same tiny checkpoint.

Same torch generator on both sides, output_type="np". Tolerance: max |diff| <= 1e-4 on images in
[0, 1] (the fp32 graphs differ from PyTorch by reduction order only; measured ~2e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sprintrt.defaults import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from sprintrt.metrics import PARITY_MAX_ABS

TOL = PARITY_MAX_ABS  # max |diff| vs diffusers, images in [0, 1] (sprintrt/metrics.py)
CHI = DEFAULT_COMPLEX_HUMAN_INSTRUCTION

CASES = {
    "1 step": dict(prompt="A cat sleeping on a windowsill", num_inference_steps=1, intermediate_timesteps=None,
                   height=256, width=320, use_resolution_binning=False),
    "2 steps, default intermediate 1.3": dict(prompt="a red fox standing in fresh snow", num_inference_steps=2,
                                              height=192, width=128, use_resolution_binning=False),
    "4 steps, linspace": dict(prompt="a lighthouse on a rocky cliff", num_inference_steps=4, intermediate_timesteps=None,
                              height=128, width=224, use_resolution_binning=False),
    "binning on (300x200 → 1.46 bin 1216x832, resized back)": dict(
        prompt="a robot chef cooking pancakes", num_inference_steps=1, intermediate_timesteps=None,
        height=300, width=200, use_resolution_binning=True),
    "two prompts x 2 images": dict(prompt=["a koi pond", "A steaming cup of coffee next to an open notebook"],
                                   num_images_per_prompt=2, num_inference_steps=2, height=128, width=160,
                                   use_resolution_binning=False),
    "without complex human instruction": dict(prompt="a panda eating bamboo", complex_human_instruction=None,
                                              num_inference_steps=2, height=160, width=128,
                                              use_resolution_binning=False),
    # The tiny VAE compresses 32x (like DC-AE f32c32): 64x96 is a 2x3 latent, below any TensorRT bin but
    # fine for ONNX Runtime engines, as for diffusers.
    "64x96 (2x3 latents)": dict(prompt="a small red boat", num_inference_steps=1, intermediate_timesteps=None,
                                height=64, width=96, use_resolution_binning=False),
    "96x64 (3x2 latents), 2 steps": dict(prompt="a tall narrow tower", num_inference_steps=2, height=96, width=64,
                                         use_resolution_binning=False),
    "custom guidance and max_sequence_length": dict(prompt="a snow globe", guidance_scale=3.0, max_sequence_length=64,
                                                    num_inference_steps=1, intermediate_timesteps=None, height=128,
                                                    width=128, use_resolution_binning=False),
}


def _run_both(reference_pipe, sprint_pipe, output_type="np", seed=1234, **kw):
    ref = reference_pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type=output_type).images
    ours = sprint_pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type=output_type).images
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
    return ref, ours


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_diffusers(case, reference_pipe, sprint_pipe):
    ref, ours = _run_both(reference_pipe, sprint_pipe, **CASES[case])
    assert ours.shape == ref.shape
    assert ours.dtype == np.float32
    # The image must carry signal (not saturated to 0/1), or the comparison would prove nothing.
    assert 0.05 < ref.std() and ((ref == 0) | (ref == 1)).mean() < 0.5
    assert np.abs(ours - ref).max() <= TOL


def test_latents_match_diffusers(reference_pipe, sprint_pipe):
    """output_type="latent" has no clamp, so it is the strictest check of the scheduler math."""
    kw = dict(prompt="a hot air balloon festival", num_inference_steps=2, height=128, width=192,
              use_resolution_binning=False)
    ref, ours = _run_both(reference_pipe, sprint_pipe, output_type="latent", **kw)
    assert ours.shape == ref.shape == (1, 32, 4, 6)
    assert np.abs(ours - ref).max() <= TOL * np.abs(ref).max()


def test_user_latents_match_diffusers(reference_pipe, sprint_pipe):
    latents = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt="a field of lavender", num_inference_steps=1, intermediate_timesteps=None, height=128, width=128,
              use_resolution_binning=False)
    ref = reference_pipe(**kw, latents=latents, generator=torch.Generator().manual_seed(0), output_type="np").images
    ours = sprint_pipe(**kw, latents=latents.numpy(), generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(ours - ref).max() <= TOL


def test_list_of_generators_match_diffusers(reference_pipe, sprint_pipe):
    kw = dict(prompt=["a tiger in tall grass", "an owl under a full moon"], num_inference_steps=2, height=128,
              width=128, use_resolution_binning=False, output_type="np")
    ref = reference_pipe(**kw, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    ours = sprint_pipe(**kw, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    assert np.abs(ours - ref).max() <= TOL


def test_pil_output_matches_diffusers(reference_pipe, sprint_pipe):
    kw = dict(prompt="a vintage typewriter", num_inference_steps=1, intermediate_timesteps=None, height=128,
              width=160, use_resolution_binning=False)
    ref, ours = _run_both(reference_pipe, sprint_pipe, output_type="pil", **kw)
    a, b = np.asarray(ref[0]).astype(int), np.asarray(ours[0]).astype(int)
    assert a.shape == b.shape == (128, 160, 3)
    assert np.abs(a - b).max() <= 1  # a 1e-4 difference can round to the neighbouring uint8


def test_seeds_and_prompts_change_the_image(sprint_pipe):
    kw = dict(num_inference_steps=1, intermediate_timesteps=None, height=128, width=128,
              use_resolution_binning=False, output_type="np")
    a = sprint_pipe("a koi pond", generator=0, **kw).images
    assert np.array_equal(a, sprint_pipe("a koi pond", generator=0, **kw).images)
    assert np.abs(a - sprint_pipe("a koi pond", generator=1, **kw).images).max() > 0.01
    assert np.abs(a - sprint_pipe("a desert with dunes", generator=0, **kw).images).max() > 0.01


def test_timings_cover_every_stage(sprint_pipe):
    out = sprint_pipe("a bakery display", num_inference_steps=2, height=128, width=128, use_resolution_binning=False,
                      generator=0, output_type="np")
    t = out.timings
    assert len(t["transformer"]) == 2
    stages = t["tokenize"] + t["text_encoder"] + sum(t["transformer"]) + t["scheduler"] + t["noise"] + \
        t["vae_decoder"] + t["postprocess"]
    assert 0 < stages <= t["total"]


@pytest.mark.parametrize("trim", [True, False])
def test_trimmed_text_padding_gives_diffusers_images(trim, reference_pipe, sprint_pipe, monkeypatch, engine_spy):
    """The encoder runs on the real tokens only (trim) or on the full padded text; both give diffusers'
    images (TOL), and trimming really shortens the encoder's input: 2 prompts of different lengths
    run at the longer one's token count (the instruction's prefix reuse is off here:
    tests/runtime/test_text_prefix.py covers it)."""
    recorder = engine_spy(sprint_pipe.text_encoder, "input_ids")
    monkeypatch.setattr(sprint_pipe, "text_encoder", recorder)
    monkeypatch.setattr(sprint_pipe, "trim_padding", trim)
    monkeypatch.setattr(sprint_pipe, "reuse_instruction_prefix", False)
    prompts = ["a koi pond", "a steaming cup of coffee next to an open notebook on a wooden desk"]
    kw = dict(prompt=prompts, num_inference_steps=2, height=128, width=128, use_resolution_binning=False)
    ref, ours = _run_both(reference_pipe, sprint_pipe, **kw)
    assert np.abs(ours - ref).max() <= TOL
    chi = "\n".join(CHI)
    padded = sprint_pipe.tokenizer.text_length(300, chi)
    _, mask = sprint_pipe.tokenizer([p.lower() for p in prompts], 300, chi)
    longest = int(mask.sum(1).max())
    assert mask.sum(1).min() < longest < padded  # the case has padding, unequal rows
    assert recorder.shapes == [(2, longest if trim else padded)]


def test_trimmed_embeddings_equal_diffusers_on_real_tokens(reference_pipe, sprint_pipe):
    """encode_prompt's embeddings equal diffusers' wherever the mask is 1; positions past the longest
    prompt are zeros (never read: the transformer masks them out)."""
    prompts = ["a lighthouse on a rocky cliff", "an owl"]
    ref_embeds, ref_mask = reference_pipe.encode_prompt(prompts, device="cpu",
                                                        complex_human_instruction=list(CHI))
    embeds, mask = sprint_pipe.encode_prompt(prompts, complex_human_instruction=list(CHI))
    ref_embeds, ref_mask = ref_embeds.detach().numpy(), ref_mask.numpy()
    assert np.array_equal(mask, ref_mask)
    real = mask.astype(bool)
    assert np.abs(embeds[real] - ref_embeds[real]).max() <= TOL * np.abs(ref_embeds[real]).max()
    longest = real.sum(1).max()  # right padding: past the longest row no row has a real token
    assert not np.any(embeds[:, longest:]) and longest < mask.shape[1]


def test_a_truncated_prompt_uses_the_full_length(sprint_pipe, monkeypatch, engine_spy):
    """A prompt longer than max_sequence_length has no padding left to trim."""
    recorder = engine_spy(sprint_pipe.text_encoder, "input_ids")
    monkeypatch.setattr(sprint_pipe, "text_encoder", recorder)
    sprint_pipe.encode_prompt("a very long prompt " * 40, max_sequence_length=32, complex_human_instruction=None)
    assert recorder.shapes == [(1, 32)]
