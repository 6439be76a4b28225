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
from sprintrt.errors import invalid
from sprintrt.export import specs as S
from sprintrt.runtime import image as I
from sprintrt.runtime.pipeline import Clock, SprintPipeline, generate_arguments
from sprintrt.runtime.scheduler import SCMScheduler, cos32, sin32


def start_index(num_inference_steps: int, strength: float) -> int:
    """The first step image to image runs (SanaSprintImg2ImgPipeline.get_timesteps)."""
    init = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init, 0))


class SprintImg2ImgPipeline(SprintPipeline):
    COMPONENTS = S.IMAGE_TO_IMAGE  # the text-to-image engines and the VAE encoder

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = D.DEFAULT_STEPS,
        timesteps: list[float] | None = None,
        max_timesteps: float | None = D.DEFAULT_MAX_TIMESTEPS,
        intermediate_timesteps: float | None = D.DEFAULT_INTERMEDIATE_TIMESTEPS,
        guidance_scale: float = D.DEFAULT_GUIDANCE_SCALE,
        image=None,
        strength: float = D.DEFAULT_STRENGTH,
        num_images_per_prompt: int = 1,
        height: int = D.DEFAULT_HEIGHT,
        width: int = D.DEFAULT_WIDTH,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        prompt_attention_mask=None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = False,
        use_resolution_binning: bool = True,
        max_sequence_length: int = D.DEFAULT_MAX_SEQUENCE_LENGTH,
        complex_human_instruction: list[str] | None = list(S.DEFAULT_COMPLEX_HUMAN_INSTRUCTION),
    ):
        """Generate images from `image` and the prompt. Arguments and defaults are
        SanaSprintImg2ImgPipeline.__call__'s: `image` is a PIL image, an HxWx3 NumPy array or a 3xHxW torch
        tensor with values in [0, 1] (or a list / batch of them), `strength` in (0, 1] is how much of the
        schedule runs (1: all of it, from almost pure noise). Returns SprintPipelineOutput."""
        self._check_strength(strength)
        kind, images = I.image_batch(image)
        if self.vae_encoder is None:
            raise invalid("image", "an image", "a pipeline with the vae_encoder engine",
                          "export and build the vae_encoder (`sprintrt export` does by default), then load "
                          "SprintImg2ImgPipeline.from_engines(dir)")

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

        return self._generate(start, **generate_arguments(locals()))

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
