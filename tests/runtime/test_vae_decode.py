"""Sliced and tiled VAE decoding vs diffusers' AutoencoderDC.enable_slicing() / enable_tiling() on the
tiny checkpoint (same tolerance as the pipeline parity tests: max |diff| <= 1e-4 on [0, 1] images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sprintrt.errors import InvalidInputError
from sprintrt.metrics import PARITY_MAX_ABS

TOL = PARITY_MAX_ABS  # max |diff| vs diffusers, images in [0, 1] (sprintrt/metrics.py)
TILE = dict(tile_sample_min_height=192, tile_sample_min_width=192, tile_sample_stride_height=128,
            tile_sample_stride_width=128)  # 6-latent tiles, stride 4: a 12x12 latent is 3x3 tiles


def _run(pipe, **kw):
    args = dict(prompt="a lighthouse on a rocky cliff", num_inference_steps=1, intermediate_timesteps=None,
                use_resolution_binning=False, output_type="np")
    args.update(kw)
    return pipe(**args, generator=torch.Generator().manual_seed(11)).images


@pytest.fixture
def tiled_reference(reference_pipe):
    reference_pipe.vae.enable_tiling(**TILE)
    yield reference_pipe
    reference_pipe.vae.disable_tiling()


def test_tiled_decoding_matches_diffusers_tiling(tiled_reference, sprint_pipe, monkeypatch, engine_spy):
    calls = engine_spy(sprint_pipe.vae_decoder, "latent")
    monkeypatch.setattr(sprint_pipe, "vae_decoder", calls)
    sprint_pipe.enable_vae_tiling(**TILE)
    try:
        ours = _run(sprint_pipe, height=384, width=384)
        sprint_pipe.disable_vae_tiling()
        whole = _run(sprint_pipe, height=384, width=384)
    finally:
        sprint_pipe.disable_vae_tiling()
    ref = _run(tiled_reference, height=384, width=384)
    assert ours.shape == ref.shape == (1, 384, 384, 3)
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours - whole).max() > 10 * TOL  # the tiles really were blended, not one decode
    tiles = [(1, 32, h, w) for h in (6, 6, 4) for w in (6, 6, 4)]  # starts 0, 4, 8; the last tiles are cut
    assert calls.shapes == tiles + [(1, 32, 12, 12)]


def test_sliced_decoding_decodes_one_image_at_a_time(reference_pipe, sprint_pipe, monkeypatch, engine_spy):
    calls = engine_spy(sprint_pipe.vae_decoder, "latent")
    monkeypatch.setattr(sprint_pipe, "vae_decoder", calls)
    sprint_pipe.enable_vae_slicing()
    try:
        ours = _run(sprint_pipe, prompt=["a koi pond", "a red barn"], num_images_per_prompt=2, height=128, width=160)
    finally:
        sprint_pipe.disable_vae_slicing()
    ref = _run(reference_pipe, prompt=["a koi pond", "a red barn"], num_images_per_prompt=2, height=128, width=160)
    assert np.abs(ours - ref).max() <= TOL
    assert calls.shapes == [(1, 32, 4, 5)] * 4


@pytest.mark.parametrize("kw, name", [
    (dict(tile_sample_min_height=100), "tile_sample_min_height"),  # not a multiple of 32
    (dict(tile_sample_stride_width=640), "tile_sample_stride_width"),  # stride > tile: gaps
    (dict(tile_sample_min_width=-64), "tile_sample_min_width"),
])
def test_bad_tiling_is_a_typed_error(sprint_pipe, kw, name):
    with pytest.raises(InvalidInputError, match=name):
        sprint_pipe.enable_vae_tiling(**kw)
    assert sprint_pipe.vae_tiling is None  # nothing half-applied


def test_decode_latents_gives_the_calls_own_images_as_diffusers_decodes_them(reference_pipe, sprint_pipe):
    """Latents kept with output_type="latent" and decoded later: the same images as the call that decodes them,
    and as diffusers' `vae.decode(latents / scaling_factor)` + its image processor, within the parity tolerance."""
    latents = _run(sprint_pipe, height=192, width=256, output_type="latent")
    images = sprint_pipe.decode_latents(latents)
    assert np.array_equal(images, _run(sprint_pipe, height=192, width=256))
    vae = reference_pipe.vae
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    ref = reference_pipe.image_processor.postprocess(decoded, output_type="np")
    assert np.abs(images - ref).max() <= TOL
    assert sprint_pipe.decode_latents(latents, output_type="pil")[0].size == (256, 192)
    with pytest.raises(InvalidInputError, match="latents="):
        sprint_pipe.decode_latents(latents[:, :2])
    with pytest.raises(InvalidInputError, match="output_type="):
        sprint_pipe.decode_latents(latents, output_type="latent")
