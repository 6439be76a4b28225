"""`export --vae`: a drop-in AutoencoderDC (DC-AE-Lite style: same latents, a lighter decoder) replaces
the checkpoint's VAE decoder, and the pipeline then matches diffusers' pipeline with that VAE swapped in
(tolerance: the parity tests' max |diff| <= 1e-4 on [0, 1] images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sprintrt.errors import InvalidInputError, ModelLoadError
from sprintrt.export.checkpoint import arch_configs
from sprintrt.metrics import PARITY_MAX_ABS

TOL = PARITY_MAX_ABS  # max |diff| vs diffusers, images in [0, 1] (sprintrt/metrics.py)


def _save_vae(path, seed: int, **changes):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    vae = AutoencoderDC(**dict(arch_configs("tiny")["vae"], **changes)).eval()
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def lite_vae(tmp_path_factory):
    # Narrower early decoder stages, like a lighter decoder for the same latent space.
    return _save_vae(tmp_path_factory.mktemp("lite") / "vae", 123, decoder_block_out_channels=[4, 8, 8, 16, 32, 32])


def test_exported_lite_vae_matches_diffusers_with_that_vae(tiny_checkpoint, lite_vae, reference_pipe, tmp_path):
    import json

    from diffusers import AutoencoderDC

    from sprintrt.engines.build import build_engines
    from sprintrt.export.checkpoint import load_pipeline
    from sprintrt.export.onnx_export import export_model
    from sprintrt.runtime.pipeline import SprintPipeline

    onnx_dir = export_model(tiny_checkpoint, tmp_path / "onnx", vae=lite_vae, dtypes=("fp32",))
    info = json.loads((onnx_dir / "export_info.json").read_text())
    assert info["model"]["vae"]["source"] == str(lite_vae)
    pipe = SprintPipeline.from_engines(build_engines(onnx_dir, tmp_path / "engines"))
    ref = load_pipeline(tiny_checkpoint)
    ref.vae = AutoencoderDC.from_pretrained(lite_vae)
    kw = dict(prompt="a koi pond", num_inference_steps=1, intermediate_timesteps=None, height=128, width=160,
              use_resolution_binning=False, output_type="np")
    ours = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    lite = ref(**kw, generator=torch.Generator().manual_seed(3)).images
    own = reference_pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    assert np.abs(ours - lite).max() <= TOL
    assert np.abs(ours - own).max() > 0.01  # it really decoded with the other VAE


def test_a_vae_for_other_latents_is_refused(tiny_checkpoint, tmp_path):
    from sprintrt.export.onnx_export import export_model

    other = _save_vae(tmp_path / "other", 5, latent_channels=16, decoder_block_out_channels=[8, 8, 16, 16, 16, 16],
                      encoder_block_out_channels=[8, 8, 16, 16, 16, 16])
    with pytest.raises(InvalidInputError, match="latent channels"):
        export_model(tiny_checkpoint, tmp_path / "onnx", vae=other)
    assert not (tmp_path / "onnx").exists()


def test_a_vae_path_without_config_is_a_typed_error(tiny_checkpoint, tmp_path):
    from sprintrt.export.onnx_export import export_model

    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing" / "x" / "y"):
        with pytest.raises(ModelLoadError, match="vae="):
            export_model(tiny_checkpoint, tmp_path / "onnx", vae=bad)
    assert not (tmp_path / "onnx").exists()
