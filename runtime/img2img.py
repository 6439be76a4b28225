"""SprintImg2ImgPipeline: SANA-Sprint image to image over engines, a drop-in for diffusers'
SanaSprintImg2ImgPipeline (same arguments and defaults, same images for the same weights and noise).

What differs from text to image (docs/SANA_SPRINT_SPEC.md §7): the input image is resized to the
(binned) size and mapped to [-1, 1], encoded by the VAE encoder engine and scaled by the VAE's
scaling factor and sigma_data; the TrigFlow steps start at t_start = int(max(n - min(n * strength, n),
0)), from cos(t) * image_latents + sin(t) * noise * sigma_data at that step's angle. Everything else
(prompt encoding, the steps, decoding) is SprintPipeline's own code.
"""

from __future__ import annotations

import math

import numpy as np

from sprintrt import defaults as D
from sprintrt import specs as S
from sprintrt.errors import invalid
from sprintrt.runtime import image as I
from sprintrt.runtime.call import IMAGE_TO_IMAGE, CallArguments, pipeline_call
from sprintrt.runtime.pipeline import Clock, SprintPipeline
from sprintrt.runtime.scheduler import SCMScheduler, cos32, sin32


def start_index(num_inference_steps: int, strength: float) -> int:
    """The first step image to image runs (SanaSprintImg2ImgPipeline.get_timesteps)."""
    init = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init, 0))


class SprintImg2ImgPipeline(SprintPipeline):
    COMPONENTS = S.IMAGE_TO_IMAGE  # the text-to-image engines and the VAE encoder

    @pipeline_call(IMAGE_TO_IMAGE)
    def __call__(self, args: CallArguments):
        """Generate images from `image` and the prompt. Arguments and defaults are
        SanaSprintImg2ImgPipeline.__call__'s (runtime/call.py): `image` is a PIL image, an HxWx3 NumPy array or
        a 3xHxW torch tensor with values in [0, 1] (or a list / batch of them), `strength` in (0, 1] is how
        much of the schedule runs (1: all of it, from almost pure noise). Returns SprintPipelineOutput."""
        kind, images = self._check_image(args)
        strength = args.strength

        def start(scheduler: SCMScheduler, shape: tuple, draw, user_latents, clock: Clock):
            t0 = start_index(len(scheduler.timesteps) - 1, strength)
            steps = scheduler.steps()[t0:]
            if user_latents is not None:  # diffusers uses them as they are (no image, no noise, no sigma_data)
                return self._check_latents(user_latents, shape), steps
            f = self.vae_scale_factor
            with clock("preprocess"):
                pixels = I.preprocess_image(kind, images, shape[2] * f, shape[3] * f)
            with clock("vae_encoder"):
                encoded = self.vae_encoder(sample=pixels)["latent"]
            image_latents = self._batch_latents(encoded, shape[0]) * np.float32(self.constants.vae_scaling_factor) \
                * np.float32(self.constants.sigma_data)
            with clock("noise"):
                noise = draw(shape) * np.float32(self.constants.sigma_data)
            t = scheduler.timesteps[t0]
            return cos32(t) * image_latents + sin32(t) * noise, steps

        return self._generate(start, args)

    @pipeline_call(IMAGE_TO_IMAGE)
    def check_arguments(self, args: CallArguments) -> None:
        """Raise the InvalidInputError a call with these arguments would raise, without running an engine."""
        self._check_image(args)
        self._check_arguments(args)

    def _check_image(self, args: CallArguments) -> tuple[str, object]:
        self._check_strength(args.strength)
        kind, images = I.image_batch(args.image)
        if self.vae_encoder is None:
            raise invalid("image", "an image", "a pipeline with the vae_encoder engine",
                          "export and build the vae_encoder (`sprintrt export` does by default), then load "
                          "SprintImg2ImgPipeline.from_engines(dir)")
        return kind, images

    @staticmethod
    def _check_strength(strength) -> None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)) \
                or not math.isfinite(strength) or not 0 < strength <= 1:
            raise invalid("strength", strength, f"a number in (0, 1] (default {D.DEFAULT_STRENGTH}; 1 runs every step)",
                          f"pass e.g. strength={D.DEFAULT_STRENGTH}")

    @staticmethod
    def _batch_latents(latents: np.ndarray, batch: int) -> np.ndarray:
        """One latent per image of the batch: images are repeated batch-wise (torch.cat([x] * k)) as diffusers does."""
        n = latents.shape[0]
        if batch % n:
            raise invalid("image", f"a batch of {n} images", f"a number of images that divides the {batch} images "
                          "generated (prompts x num_images_per_prompt)", "pass one image, or one per prompt")
        return np.concatenate([latents] * (batch // n), axis=0) if batch > n else latents
