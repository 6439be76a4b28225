"""Binning, bilinear resize-back and post-processing vs diffusers / torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import PixArtImageProcessor, VaeImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN

from sprintrt import bins
from sprintrt.runtime import image as I


def test_bin_tables_are_diffusers_tables():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN

    assert {k: tuple(int(x) for x in v) for k, v in ASPECT_RATIO_1024_BIN.items()} == bins.ASPECT_RATIO_1024_BIN
    assert {k: tuple(int(x) for x in v) for k, v in ASPECT_RATIO_512_BIN.items()} == bins.ASPECT_RATIO_512_BIN


@pytest.mark.parametrize("h,w", [(1024, 1024), (300, 200), (200, 300), (512, 2048), (4000, 100), (100, 4000),
                                 (777, 1000), (1000, 1070)])
def test_binning_matches_diffusers(h, w):
    assert bins.classify_height_width_bin(h, w) == PixArtImageProcessor.classify_height_width_bin(h, w, ASPECT_RATIO_1024_BIN)


@pytest.mark.parametrize("src,dst", [((64, 96), (40, 50)), ((32, 32), (100, 70)), ((1216, 832), (300, 200)),
                                     ((7, 5), (7, 9))])
def test_bilinear_matches_torch(src, dst):
    x = np.random.default_rng(0).standard_normal((2, 3, *src)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False).numpy()
    assert np.abs(I.resize_bilinear(x, *dst) - ref).max() < 1e-5


@pytest.mark.parametrize("src,dst", [((1216, 832), (300, 200)), ((64, 64), (48, 64)), ((64, 96), (64, 96))])
def test_resize_and_crop_matches_diffusers(src, dst):
    x = np.random.default_rng(1).standard_normal((1, 3, *src)).astype(np.float32)
    ref = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(x), dst[1], dst[0]).numpy()
    ours = I.resize_and_crop(x, *dst)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5


def test_postprocess_matches_diffusers():
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 6)).astype(np.float32)
    proc = VaeImageProcessor(vae_scale_factor=32)
    ref_np = proc.postprocess(torch.from_numpy(x), output_type="np")
    assert np.array_equal(I.postprocess(x, "np"), ref_np)
    ref_pil = proc.postprocess(torch.from_numpy(x), output_type="pil")
    for a, b in zip(I.postprocess(x, "pil"), ref_pil):
        assert np.array_equal(np.asarray(a), np.asarray(b))
