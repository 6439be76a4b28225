"""SprintImg2ImgPipeline over ONNX Runtime vs diffusers' SanaSprintImg2ImgPipeline on the tiny checkpoint
(its DC-AE compresses 32x, like the released f32c32). Same torch generator on both sides,
output_type="np"; tolerance: the parity tolerance (max |diff| <= 1e-4 on [0, 1] images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sprintrt.defaults import intermediate_timesteps_for
from sprintrt.errors import InvalidInputError
from sprintrt.metrics import PARITY_MAX_ABS

TOL = PARITY_MAX_ABS


@pytest.fixture(scope="module")
def reference_img2img(reference_pipe):
    from diffusers import SanaSprintImg2ImgPipeline

    pipe = SanaSprintImg2ImgPipeline(**reference_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def img2img_pipe(engine_dir):
    from sprintrt import SprintImg2ImgPipeline

    return SprintImg2ImgPipeline.from_engines(engine_dir)


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture in [0, 1] (HxWx3), so resizing matters and the encoder sees structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 0.4 + 0.5
    return np.clip(base + rng.normal(0, 0.03, size=base.shape), 0, 1).astype(np.float32)


def _both(reference, ours, seed=7, **kw):
    kw = dict(kw, output_type=kw.get("output_type", "np"))
    ref = reference(**kw, generator=torch.Generator().manual_seed(seed)).images
    got = ours(**kw, generator=torch.Generator().manual_seed(seed)).images
    return (ref.numpy() if isinstance(ref, torch.Tensor) else ref), got


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_matches_diffusers_across_strengths_and_steps(reference_img2img, img2img_pipe, strength, steps):
    kw = dict(prompt="a watercolor lighthouse", image=Image.fromarray((_picture(150, 110) * 255).astype(np.uint8)),
              strength=strength, num_inference_steps=steps, height=160, width=128, use_resolution_binning=False)
    if steps != 2:
        kw["intermediate_timesteps"] = None
    ref, ours = _both(reference_img2img, img2img_pipe, **kw)
    assert ours.shape == ref.shape == (1, 160, 128, 3)
    assert 0.05 < ref.std()
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("kind", ["numpy", "pil", "torch"])
def test_image_kinds_and_binning(reference_img2img, img2img_pipe, kind):
    """Binning on (200x300 → the 0.68 bin, resized back), the image given as NumPy / PIL / torch at a size
    other than the binned one (NumPy: nearest resize, PIL: Lanczos, torch: bilinear, as diffusers)."""
    pic = _picture(90, 140, seed=1)
    image = {"numpy": pic, "pil": Image.fromarray((pic * 255).astype(np.uint8)),
             "torch": torch.from_numpy(pic.transpose(2, 0, 1).copy())}[kind]
    kw = dict(prompt="an autumn forest", image=image, strength=0.6, num_inference_steps=2, height=200, width=300,
              use_resolution_binning=True)
    ref, ours = _both(reference_img2img, img2img_pipe, **kw)
    assert ours.shape == ref.shape == (1, 200, 300, 3)
    assert np.abs(ours - ref).max() <= TOL


def test_two_prompts_two_images_each(reference_img2img, img2img_pipe):
    kw = dict(prompt=["a koi pond", "A steaming cup of coffee"], image=_picture(128, 96, seed=2),
              num_images_per_prompt=2, strength=0.6, num_inference_steps=2, height=128, width=96,
              use_resolution_binning=False)
    ref, ours = _both(reference_img2img, img2img_pipe, **kw)
    assert ours.shape == (4, 128, 96, 3)
    assert np.abs(ours - ref).max() <= TOL


def test_small_sizes_on_a_32x_vae(reference_img2img, img2img_pipe):
    for h, w in ((64, 96), (96, 64)):
        kw = dict(prompt="a red kite", image=_picture(h, w, seed=3), strength=0.6, num_inference_steps=1,
                  intermediate_timesteps=None, height=h, width=w, use_resolution_binning=False)
        ref, ours = _both(reference_img2img, img2img_pipe, **kw)
        assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("steps,strength,runs", [(2, 0.3, 1), (2, 0.6, 2), (2, 1.0, 2), (4, 0.6, 3), (4, 0.3, 2)])
def test_strength_sets_how_many_steps_run_and_the_image_matters(img2img_pipe, steps, strength, runs):
    from sprintrt.runtime.img2img import start_index

    assert steps - start_index(steps, strength) == runs  # t_start = int(max(n - min(n * strength, n), 0))
    kw = dict(prompt="a field", strength=strength, num_inference_steps=steps, height=128, width=128,
              intermediate_timesteps=intermediate_timesteps_for(steps), use_resolution_binning=False, output_type="np",
              generator=0)
    a = img2img_pipe(image=_picture(128, 128, seed=4), **kw)
    b = img2img_pipe(image=_picture(128, 128, seed=5)[::-1].copy(), **kw)
    assert len(a.timings["transformer"]) == runs and a.timings["vae_encoder"] > 0
    # The start is cos(t) x image + sin(t) x noise: at the first angle (t = max = pi/2) the image is all
    # but gone (cos t ~ 4e-6); any later start keeps it.
    differ = np.abs(a.images - b.images).max()
    assert differ > 1e-3 if runs < steps else differ < 1e-4


@pytest.mark.parametrize("override,match", [
    (dict(strength=0.0), "strength=0.0.*\\(0, 1\\]"),
    (dict(strength=1.5), "strength=1.5"),
    (dict(strength=float("nan")), "strength=nan"),
    (dict(image=None), "image=None"),
    (dict(image=np.zeros((32, 32, 4), np.float32)), "image=.*shape \\(32, 32, 4\\).*3 channels"),
    (dict(image=Image.new("RGBA", (32, 32))), "mode 'RGBA'.*convert\\('RGB'\\)"),
    (dict(image=[np.zeros((32, 32, 3), np.float32)] * 3), "batch of 3 images"),
    (dict(height=4128), "height=4128.*pixels"),
])
def test_bad_input_is_a_typed_error(img2img_pipe, override, match):
    kw = dict(prompt="a cat", image=_picture(64, 64), strength=0.6, num_inference_steps=1, intermediate_timesteps=None,
              height=64, width=64, use_resolution_binning=False, output_type="np")
    with pytest.raises(InvalidInputError, match=match):
        img2img_pipe(**{**kw, **override})


def test_image_files_are_checked(tmp_path):
    from sprintrt.runtime.image import load_image_file

    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image_file(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InvalidInputError, match="cannot be read"):
        load_image_file(bad)


def test_text_to_image_pipeline_needs_no_encoder(engine_dir):
    from sprintrt import SprintPipeline

    pipe = SprintPipeline.from_engines(engine_dir)
    assert pipe.vae_encoder is None and "vae_encoder" not in pipe.limits


def test_cli_generates_from_an_image_file(engine_dir, tmp_path):
    import subprocess
    import sys

    src = tmp_path / "in.png"
    Image.fromarray((_picture(100, 80) * 255).astype(np.uint8)).convert("RGBA").save(src)  # alpha is dropped
    out = tmp_path / "out.png"
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "generate", str(engine_dir), "--prompt", "a cat", "-o",
                        str(out), "--image", str(src), "--strength", "0.5", "--steps", "1", "--height", "128",
                        "--width", "96", "--no-binning"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (96, 128)
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "generate", str(engine_dir), "--prompt", "a cat", "-o",
                        str(tmp_path / "x.png"), "--image", str(tmp_path / "nope.png")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "nope.png" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_drift_covers_image_to_image(engine_dir, tmp_path):
    """fp32 engines against themselves, image to image: every component, the VAE encoder included, is
    identical and the images agree."""
    from sprintrt.benchmarks import drift as D

    doc = D.run_drift(engine_dir, {"same": engine_dir}, ["a red barn"], [0], size=128, steps=2, say=lambda *a: None,
                      strength=0.6)
    (same,) = doc["systems"]
    assert set(same["components"]) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    assert same["components"]["vae_encoder"]["samples"] == 1 and same["components"]["vae_encoder"]["max_abs"] == 0
    assert same["image_psnr_db"]["min"] > 80
    assert "Image to image at strength 0.6" in D.report(doc)
