"""SprintControlNetPipeline: SANA-Sprint with a ControlNet over engines.

diffusers has a ControlNet pipeline for SANA (SanaControlNetPipeline, 20-step flow matching) and a SANA-Sprint
pipeline, but no SANA-Sprint ControlNet pipeline. This one is SanaSprintPipeline's call (the same steps: this
module reuses SprintPipeline._generate) plus SanaControlNetPipeline's two ControlNet arguments, handled as that
pipeline handles them:

- `control_image` is prepared as SanaControlNetPipeline.prepare_image does: PIL images and NumPy arrays in
  [0, 1] resized to the (binned) size and mapped to [-1, 1]; a torch tensor is taken as it is (already in
  [-1, 1] at that size, NCHW); one image is repeated for every image generated, several (one per prompt) are
  each repeated num_images_per_prompt times (repeat_interleave). It is VAE-encoded once per call and
  multiplied by the VAE's scaling factor (not by sigma_data).
- every step runs the ControlNet on the transformer's own inputs (the scaled latents, the prompt, the
  timestep; the ControlNet has no guidance embedding) and the control latent; its residuals, times
  `controlnet_conditioning_scale` (a float, or one per ControlNet block), go into the transformer, which
  adds residual k - 1 after its block k (diffusers' placement; NVlabs' training code adds the same residuals
  before block k + 1, i.e. at the same place).
"""

from __future__ import annotations

import math

import numpy as np

from sprintrt import specs as S
from sprintrt.errors import invalid
from sprintrt.runtime import image as I
from sprintrt.runtime.call import CONTROLNET, CallArguments, pipeline_call
from sprintrt.runtime.pipeline import Clock, SprintPipeline
from sprintrt.runtime.scheduler import SCMScheduler


class SprintControlNetPipeline(SprintPipeline):
    COMPONENTS = S.CONTROLNET_TO_IMAGE  # text encoder, ControlNet, controlled transformer, VAE decoder and encoder

    @pipeline_call(CONTROLNET)
    def __call__(self, args: CallArguments):
        """Generate images that follow `control_image` (e.g. a scribble: white strokes on black). Arguments and
        defaults are SanaSprintPipeline.__call__'s plus `control_image` (PIL image, HxWx3 NumPy array in [0, 1],
        NCHW torch tensor in [-1, 1] at the generated size, or a list: one, or one per prompt) and
        `controlnet_conditioning_scale` (a float, or a list with one per ControlNet block; 0 gives the plain
        text-to-image result). Returns SprintPipelineOutput(images, timings)."""
        kind, images, count = self._check_control(args)
        scales = self._block_scales(args.controlnet_conditioning_scale)
        control: dict = {}

        def start(scheduler: SCMScheduler, shape: tuple, draw, latents, clock: Clock):
            batch = shape[0]
            prompts = batch // args.num_images_per_prompt
            if count not in (1, prompts):  # checked before any work when `prompt` is given; here for prompt_embeds
                raise invalid("control_image", f"{count} images", f"1, or one per prompt ({prompts})",
                              "pass one control image, or one per prompt")
            f = self.vae_scale_factor
            with clock("preprocess"):
                pixels = self._control_pixels(kind, images, shape[2] * f, shape[3] * f)
                # SanaControlNetPipeline.prepare_image: one image for the whole batch, else each image
                # num_images_per_prompt times in a row.
                pixels = np.repeat(pixels, batch if count == 1 else batch // count, axis=0)
            with clock("vae_encoder"):
                encoded = self.vae_encoder(sample=pixels)["latent"]
            control["latent"] = encoded * np.float32(self.constants.vae_scaling_factor)
            control["scale"] = np.ascontiguousarray(np.broadcast_to(scales, (batch, scales.size)))
            return self._start_from_noise(scheduler, shape, draw, latents, clock)

        def predict_flow(x_in, embeds, mask, timestep, guidance, clock: Clock):
            with clock("controlnet"):
                residuals = self.controlnet(hidden_states=x_in, encoder_hidden_states=embeds,
                                            encoder_attention_mask=mask, timestep=timestep,
                                            controlnet_cond=control["latent"],
                                            conditioning_scale=control["scale"])["block_samples"]
            with clock("transformer"):
                return self.controlled_transformer(hidden_states=x_in, encoder_hidden_states=embeds,
                                                   encoder_attention_mask=mask, timestep=timestep, guidance=guidance,
                                                   block_samples=residuals)["noise_pred"]

        return self._generate(start, args, predict_flow)

    @pipeline_call(CONTROLNET)
    def check_arguments(self, args: CallArguments) -> None:
        """Raise the InvalidInputError a call with these arguments would raise, without running an engine."""
        self._check_control(args)
        self._block_scales(args.controlnet_conditioning_scale)
        self._check_arguments(args)

    def text_to_image(self) -> SprintPipeline:
        """A SprintPipeline over this pipeline's loaded engines, for plain text-to-image calls (nothing loads
        twice): calibration and the tuner run both kinds of call on one set of engines."""
        engines = {c: self.engine(c) for c in S.COMPONENTS if self.engine(c) is not None}
        view = SprintPipeline(engines, self.tokenizer, self.manifest)
        for setting in ("trim_padding", "reuse_instruction_prefix", "prompt_cache", "vae_slicing", "vae_tiling"):
            setattr(view, setting, getattr(self, setting))
        return view

    @property
    def controlnet_blocks(self) -> int:
        return self.model_dims.controlnet_blocks

    def _check_control(self, args: CallArguments) -> tuple[str, object, int]:
        for component in (S.CONTROLNET, S.CONTROLLED_TRANSFORMER, S.VAE_ENCODER):
            if self.engine(component) is None:
                raise invalid("control_image", "an image", f"a pipeline with the {component} engine",
                              "export a model with a ControlNet (`sprintrt export --controlnet ...`), build it, and "
                              "load SprintControlNetPipeline.from_engines(dir)")
        kind, images = I.image_batch(args.control_image, name="control_image")
        count = len(images)
        prompts = 1 if args.prompt is None or isinstance(args.prompt, str) else len(args.prompt)
        if args.prompt is not None and count not in (1, prompts):
            raise invalid("control_image", f"{count} images", f"1, or one per prompt ({prompts})",
                          "pass one control image, or one per prompt")
        return kind, images, count

    def _block_scales(self, scale) -> np.ndarray:
        """controlnet_conditioning_scale → float32 [blocks]: a number for every block, or one per block."""
        n = self.controlnet_blocks
        values = scale if isinstance(scale, (list, tuple, np.ndarray)) else [scale]
        ok = all(not isinstance(v, bool) and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v)
                 for v in values)
        if not ok or len(values) not in (1, n):
            raise invalid("controlnet_conditioning_scale", scale, f"a finite number, or a list of {n} (one per "
                          "ControlNet block)", "pass e.g. 1.0 (0 turns the ControlNet off)")
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (n,)).copy()

    @staticmethod
    def _control_pixels(kind: str, images, height: int, width: int) -> np.ndarray:
        """The VAE encoder's input, NCHW float32 in [-1, 1], as SanaControlNetPipeline.prepare_image makes it."""
        if kind == "torch":  # diffusers takes a tensor as it is: already normalised and sized
            if images.shape[2:] != (height, width):
                raise invalid("control_image", f"a tensor of shape {tuple(images.shape)}",
                              f"N x 3 x {height} x {width} (a tensor is used as it is, as in diffusers: in [-1, 1] at "
                              "the generated size)", "pass a PIL image or a NumPy array, which are resized")
            return np.ascontiguousarray(images, dtype=np.float32)
        return I.preprocess_image(kind, images, height, width)
