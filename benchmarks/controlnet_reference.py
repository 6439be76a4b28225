"""The PyTorch reference of SANA-Sprint with a ControlNet, assembled from diffusers' own modules.

diffusers has no SANA-Sprint ControlNet pipeline. The reference is SanaSprintPipeline's own call (its
scheduler loop, binning and decoding, unmodified) whose transformer is ControlledTransformer: on the
transformer's inputs it runs SanaControlNetModel, then SanaTransformer2DModel with controlnet_block_samples,
the order and arguments SanaControlNetPipeline uses. The control image is prepared by
SanaControlNetPipeline.prepare_image and encoded by the VAE times its scaling factor, as that pipeline does.
The parity tests (tests/runtime/test_controlnet.py) and `sprintrt bench --controlnet` use it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ControlledTransformer(nn.Module):
    """Stands in for SanaSprintPipeline.transformer: the ControlNet on the transformer's inputs, then the
    transformer with its residuals. `control` (the control latent) and `scale` are set per call."""

    def __init__(self, transformer, controlnet):
        super().__init__()
        self.transformer, self.controlnet = transformer, controlnet
        self.control, self.scale = None, 1.0

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self):
        return self.transformer.dtype

    @property
    def device(self):
        return self.transformer.device

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, guidance, timestep, **kw):
        samples = self.controlnet(hidden_states.to(self.controlnet.dtype),
                                  encoder_hidden_states=encoder_hidden_states.to(self.controlnet.dtype),
                                  encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                                  controlnet_cond=self.control, conditioning_scale=1.0, return_dict=False)[0]
        # diffusers multiplies every residual by one float; a list scales residual k by scale[k].
        scale = self.scale if isinstance(self.scale, (list, tuple)) else [self.scale] * len(samples)
        samples = tuple((s * w).to(self.transformer.dtype) for s, w in zip(samples, scale))
        return self.transformer(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                encoder_attention_mask=encoder_attention_mask, guidance=guidance, timestep=timestep,
                                controlnet_block_samples=samples, **kw)


class SprintControlNetReference:
    """SanaSprintPipeline with ControlledTransformer; called like SprintControlNetPipeline (SanaSprintPipeline's
    arguments plus control_image and controlnet_conditioning_scale). Other attributes are the pipeline's."""

    def __init__(self, pipe, controlnet):
        self.pipe = pipe
        self.plain_transformer = pipe.transformer
        pipe.transformer = ControlledTransformer(pipe.transformer, controlnet)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, controlnet: str | Path | None = None, torch_dtype=None):
        """The checkpoint's SanaSprintPipeline and its controlnet/ folder's (or `controlnet`'s) SanaControlNetModel."""
        from diffusers import SanaControlNetModel

        from sprintrt.export.checkpoint import CONTROLNET_FOLDER, load_pipeline

        pipe = load_pipeline(checkpoint, torch_dtype=torch_dtype)
        kwargs = {} if torch_dtype in (None, torch.float32) else {"torch_dtype": torch_dtype}
        net = SanaControlNetModel.from_pretrained(controlnet or Path(checkpoint) / CONTROLNET_FOLDER, **kwargs).eval()
        return cls(pipe, net)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, control_image=None, controlnet_conditioning_scale=1.0, **kw):
        from diffusers import SanaControlNetPipeline
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN

        pipe = self.pipe
        height, width = kw.get("height", 1024), kw.get("width", 1024)
        if kw.get("use_resolution_binning", True):
            height, width = pipe.image_processor.classify_height_width_bin(height, width, ratios=ASPECT_RATIO_1024_BIN)
        prompt = kw.get("prompt")
        prompts = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        n = kw.get("num_images_per_prompt", 1)
        pixels = SanaControlNetPipeline.prepare_image(pipe, control_image, width, height, prompts * n, n,
                                                      pipe.vae.device, pipe.vae.dtype)
        with torch.no_grad():
            pipe.transformer.control = pipe.vae.encode(pixels).latent * pipe.vae.config.scaling_factor
        pipe.transformer.scale = controlnet_conditioning_scale
        return pipe(**kw)
