"""SprintControlNetPipeline over ONNX Runtime vs a reference assembled from diffusers' own modules.

diffusers has no SANA-Sprint ControlNet pipeline, so the reference (benchmarks/controlnet_reference.py) is
SanaSprintPipeline's own call (its scheduler loop, binning, decoding) with its transformer replaced by a module
that runs, on the same inputs, SanaControlNetModel and then SanaTransformer2DModel with controlnet_block_samples:
the order SanaControlNetPipeline uses. The control image is prepared by SanaControlNetPipeline.prepare_image and
encoded by the VAE times its scaling factor, as that pipeline does. Same torch generator on both sides.
Tolerance: max |diff| <= 1e-4 on images in [0, 1] (sprintrt/metrics.py), as for text to image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sprintrt.errors import InvalidInputError
from sprintrt.metrics import PARITY_MAX_ABS
from sprintrt.runtime.image import control_picture

TOL = PARITY_MAX_ABS


@pytest.fixture(scope="module")
def pipe(engine_dir):
    from sprintrt import SprintControlNetPipeline

    return SprintControlNetPipeline.from_engines(engine_dir)  # the session's tiny checkpoint has a ControlNet


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from sprintrt.benchmarks.controlnet_reference import SprintControlNetReference

    return SprintControlNetReference.from_pretrained(tiny_checkpoint)


def scribble(width=256, height=256, seed=0) -> Image.Image:
    """White strokes on black, the scribble format SANA's ControlNets are trained on (seeded random strokes)."""
    return control_picture(height, width, seed=seed)


def _reference_images(reference, control_image, scale, seed=1234, **kw):
    return reference(control_image=control_image, controlnet_conditioning_scale=scale, **kw,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images


CASES = {
    "1 step, scale 1": dict(prompt="a cat", num_inference_steps=1, intermediate_timesteps=None, height=256,
                            width=192, use_resolution_binning=False, scale=1.0),
    "2 steps, scale 0.5": dict(prompt="a red fox in snow", num_inference_steps=2, height=128, width=224,
                               use_resolution_binning=False, scale=0.5),
    "4 steps, scale 1, binning on (300x200)": dict(prompt="a lighthouse", num_inference_steps=4,
                                                    intermediate_timesteps=None, height=300, width=200, scale=1.0),
    "2 prompts x 2 images, one control image each": dict(prompt=["a koi pond", "a steaming cup of coffee"],
                                                         num_images_per_prompt=2, num_inference_steps=2, height=160,
                                                         width=128, use_resolution_binning=False, scale=1.0,
                                                         controls=2),
    "2 prompts x 2 images, one control image for all, scale 0.5": dict(
        prompt=["a koi pond", "a tall tower"], num_images_per_prompt=2, num_inference_steps=1,
        intermediate_timesteps=None, height=128, width=128, use_resolution_binning=False, scale=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_the_diffusers_module_reference(case, pipe, reference):
    kw = dict(CASES[case])
    scale, controls = kw.pop("scale"), kw.pop("controls", 1)
    images = [scribble(seed=s) for s in range(controls)]
    control = images[0] if controls == 1 else images
    ref = _reference_images(reference, control, scale, **kw)
    ours = pipe(**kw, control_image=control, controlnet_conditioning_scale=scale,
                generator=torch.Generator().manual_seed(1234), output_type="np").images
    assert ours.shape == ref.shape
    assert 0.05 < ref.std()
    assert np.abs(ours - ref).max() <= TOL


def test_the_controlnet_changes_the_image_and_scale_0_is_text_to_image(pipe, reference):
    """A ControlNet that added nothing (diffusers zero-initialises its projections) would pass every parity
    test: the seeded one must move the image, and scale 0 must give exactly the plain pipeline's image."""
    kw = dict(prompt="a small red boat", num_inference_steps=2, height=128, width=192, use_resolution_binning=False,
              output_type="np")
    with_control = pipe(**kw, control_image=scribble(), generator=torch.Generator().manual_seed(7)).images
    off = pipe(**kw, control_image=scribble(), controlnet_conditioning_scale=0.0,
               generator=torch.Generator().manual_seed(7)).images
    controlled = reference.pipe.transformer
    reference.pipe.transformer = reference.plain_transformer  # diffusers' SanaSprintPipeline as it is
    try:
        text_to_image = reference.pipe(**kw, generator=torch.Generator().manual_seed(7)).images
    finally:
        reference.pipe.transformer = controlled
    assert np.abs(with_control - off).max() > 0.05
    assert np.abs(off - text_to_image).max() <= TOL


def test_a_scale_per_block_matches_the_reference(pipe, reference):
    blocks = pipe.controlnet_blocks
    scale = [0.25 + 0.5 * k for k in range(blocks)]
    kw = dict(prompt="a snow globe", num_inference_steps=1, intermediate_timesteps=None, height=192, width=128,
              use_resolution_binning=False)
    ref = _reference_images(reference, scribble(seed=3), scale, **kw)
    ours = pipe(**kw, control_image=scribble(seed=3), controlnet_conditioning_scale=scale,
                generator=torch.Generator().manual_seed(1234), output_type="np").images
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("kw, field", [
    (dict(control_image=None), "control_image"),
    (dict(control_image="scribble.png"), "control_image"),
    (dict(control_image=np.zeros((64, 64))), "control_image"),
    (dict(control_image=[scribble(), scribble(), scribble()], prompt=["a", "b"]), "control_image"),
    (dict(controlnet_conditioning_scale=float("nan")), "controlnet_conditioning_scale"),
    (dict(controlnet_conditioning_scale=[1.0] * 9), "controlnet_conditioning_scale"),
    (dict(controlnet_conditioning_scale="1"), "controlnet_conditioning_scale"),
])
def test_bad_controlnet_arguments_are_typed_errors_before_any_engine_runs(pipe, kw, field):
    args = dict(prompt="a cat", control_image=scribble(), height=128, width=128, use_resolution_binning=False)
    args.update(kw)
    calls = []
    engines = {c: pipe.engine(c) for c in pipe.COMPONENTS}

    def spy(component):
        def run(**feeds):
            calls.append(component)
            return engines[component](**feeds)
        return run

    for c in engines:
        pipe.set_engine(c, spy(c))
    try:
        with pytest.raises(InvalidInputError, match=field):
            pipe(**args)
        with pytest.raises(InvalidInputError, match=field):
            pipe.check_arguments(**args)
    finally:
        for c, engine in engines.items():
            pipe.set_engine(c, engine)
    assert calls == []


def test_a_controlnet_that_does_not_fit_the_transformer_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from sprintrt.export.onnx_export import export_model

    bad = tmp_path / "cn"
    shutil.copytree(tiny_checkpoint / "controlnet", bad)
    config = json.loads((bad / "config.json").read_text())
    for change, message in ((dict(attention_head_dim=4), "hidden size"), (dict(num_layers=2), "blocks")):
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(InvalidInputError, match=message):
            export_model(tiny_checkpoint, tmp_path / "onnx", controlnet=bad)
        assert not (tmp_path / "onnx").exists()


def test_asking_for_the_controlnet_of_a_model_without_one_is_a_typed_error(tiny_checkpoint, tmp_path):
    import shutil

    from sprintrt.export.onnx_export import export_model

    plain = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint, plain, ignore=shutil.ignore_patterns("controlnet"))
    with pytest.raises(InvalidInputError, match="has no controlnet/ folder.*--controlnet"):
        export_model(plain, tmp_path / "onnx", components=("controlnet", "controlled_transformer"))
    assert not (tmp_path / "onnx").exists()
