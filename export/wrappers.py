"""Export wrappers: small nn.Modules with a fixed positional signature that return a tuple.

Their argument order is the component spec's input order (export/specs.py); nothing else about the
graph's interface is decided here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BroadcastMaskSanaAttnProcessor:
    """SANA cross-attention with the key-padding bias broadcast over heads instead of repeated.

    diffusers' SanaAttnProcessor2_0 repeats the [B, 1, S] bias per head and `.view`s it to
    [B, heads, 1, S]; the dynamo exporter cannot trace that view with a symbolic batch. Adding the
    same [B, 1, 1, S] bias to every head's scores is the identical computation.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch = hidden_states.shape[0]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attention_mask.unsqueeze(1)  # [B, 1, S] -> [B, 1, 1, S], broadcast over heads
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class TextEncoderWrapper(nn.Module):
    """Gemma2Model(input_ids, attention_mask, past) -> (last_hidden_state, the new tokens' keys/values).

    Inside the graph: embedding x sqrt(hidden), causal + key-padding mask over past and new positions,
    eager attention with logit soft-capping, final RMSNorm. The past arrives as one tensor
    [layers, 2, batch, kv_heads, past_len, head_dim] (see specs.text_encoder_spec), is loaded into a
    transformers DynamicCache, and the new positions are numbered after the real past ones, so a run
    after a cached prefix computes what one run over prefix + new tokens computes. The select_index
    slicing stays on the host.
    """

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask, past_key_values, past_attention_mask):
        from transformers.cache_utils import DynamicCache

        config = self.text_encoder.config
        # Full-length layers for every layer: the sliding-window layers' own cache (DynamicCache(config=...))
        # trims itself to 4095 positions, which the exporter turns into a static 4095 axis. No text here comes
        # near the window, and the attention masks still apply it (they read config.sliding_window).
        cache = DynamicCache()
        for layer in range(config.num_hidden_layers):
            cache.update(past_key_values[layer, 0], past_key_values[layer, 1], layer)
        new = input_ids.shape[1]
        positions = past_attention_mask.sum(dim=1, keepdim=True) + torch.arange(new, device=input_ids.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=torch.cat([past_attention_mask, attention_mask], 1),
                                position_ids=positions, past_key_values=cache, use_cache=True, return_dict=True)
        # Each layer's cache now ends with the new positions' keys and values.
        present = torch.stack([torch.stack([cache.layers[i].keys[:, :, -new:], cache.layers[i].values[:, :, -new:]])
                               for i in range(config.num_hidden_layers)])
        return out.last_hidden_state, present


class TransformerWrapper(nn.Module):
    """SanaTransformer2DModel(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, guidance).

    Inside the graph: the flow-velocity prediction only (mask → additive -10000 bias, time and
    guidance embeddings, the blocks, unpatchify). The TrigFlow conversion before and after the call
    runs in the NumPy scheduler, in float32, exactly as diffusers' pipeline does it.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        for block in transformer.transformer_blocks:
            block.attn2.set_processor(BroadcastMaskSanaAttnProcessor())

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, guidance):
        return self.run(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, guidance)

    def run(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, guidance,
            controlnet_block_samples=None):
        out = self.transformer(
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            guidance=guidance,
            controlnet_block_samples=controlnet_block_samples,
            return_dict=False,
        )
        return (out[0],)


def _stack_block_samples(samples, height: int, width: int):
    """N tensors [B, h·w, D] → one [N, B, h, w, D] (specs._block_samples: the tokens are row-major pixels)."""
    stacked = torch.stack(list(samples))
    return stacked.reshape(stacked.shape[0], stacked.shape[1], height, width, stacked.shape[-1])


class ControlNetWrapper(nn.Module):
    """SanaControlNetModel(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, controlnet_cond,
    conditioning_scale) -> block_samples [blocks, B, h, w, D].

    The model runs with conditioning_scale 1 and each block's residual is multiplied by conditioning_scale[:, k]
    here: the same product diffusers forms (`sample * conditioning_scale`), with a scale per image and per
    block as a graph input, so one engine serves every scale and a batch may mix them.
    """

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet
        for block in controlnet.transformer_blocks:
            block.attn2.set_processor(BroadcastMaskSanaAttnProcessor())

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, controlnet_cond,
                conditioning_scale):
        samples = self.controlnet(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                  controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                                  encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
        scaled = [sample * conditioning_scale[:, k, None, None] for k, sample in enumerate(samples)]
        return (_stack_block_samples(scaled, hidden_states.shape[2], hidden_states.shape[3]),)


class ControlledTransformerWrapper(TransformerWrapper):
    """TransformerWrapper with the ControlNet's residuals: block_samples [blocks, B, h, w, D], the k-th added
    after transformer block k + 1 (diffusers' controlnet_block_samples)."""

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, guidance, block_samples):
        tokens = block_samples.reshape(block_samples.shape[0], block_samples.shape[1], -1, block_samples.shape[-1])
        return self.run(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, guidance,
                        tuple(tokens.unbind(0)))


class ChannelsFirstRMSNorm(nn.Module):
    """diffusers' RMSNorm over the last axis of a 4-D tensor, computed over axis 1 between two transposes.

    DC-AE's blocks move channels last (`x.movedim(1, -1)`), normalise and move them back. Doing the
    same here puts an inverse transpose right after each of theirs, and the export's graph pass
    (cancel_transpose_pairs) deletes both: the graph normalises NCHW tensors in place. Measured on
    the real decoder at 512² in OpenVINO bf16, those transposes took 1.3 s of 5.2 s.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        if x.ndim != 4:
            return self.norm(x)
        n = self.norm
        y = x.movedim(-1, 1)
        y = y * torch.rsqrt(y.pow(2).mean(1, keepdim=True) + n.eps)
        if n.weight is not None:
            y = y * n.weight.view(1, -1, 1, 1)
            if n.bias is not None:
                y = y + n.bias.view(1, -1, 1, 1)
        return y.movedim(1, -1)


def channels_first_rms_norms(module: nn.Module) -> int:
    """Wrap every diffusers RMSNorm under `module` in ChannelsFirstRMSNorm. Returns the count."""
    from diffusers.models.normalization import RMSNorm

    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, RMSNorm)]
    for parent, name, child in targets:
        setattr(parent, name, ChannelsFirstRMSNorm(child))
    return len(targets)


# Which 3x3 taps (columns) each 2x2 tap (rows) sums, for output phase 0 and 1 of nearest x2 then a 3x3 conv:
# high-res row 2i reads low-res rows i-1, i, i (taps 0 | 1+2); row 2i+1 reads i, i, i+1 (taps 0+1 | 2).
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


class SubPixelUpBlock(nn.Module):
    """diffusers' DCUpBlock2d(interpolate=True, mode "nearest") as one 2x2 convolution of the low-res input.

    Nearest x2 followed by a 3x3 convolution reads each low-res pixel several times, so each of the
    four output phases (row parity a, column parity b) is a 2x2 convolution of the low-res input
    whose taps are sums of the 3x3 taps (_PHASE_TAPS). The shortcut (input channels repeated, then
    pixel-shuffled) is one more tap of weight 1 on the pixel it copies. One Conv with padding 1
    computes all four phases as 4·out channels; pixel_shuffle interleaves them. Phase 0 reads conv
    row i and phase 1 conv row i+1, so phase 1 goes in pixel_shuffle's slot 0 and phase 0 in slot 1:
    the shuffled image is then the output shifted by one pixel, and a crop finishes it.

    The same numbers (fp32: within ~1e-6 of diffusers) with 4/9 of the convolution's multiply-adds
    and no Resize, repeat or add. Measured on the real 0.6B decoder at 512² in OpenVINO bf16 (AMD
    EPYC Zen 5, 2 cores): 2.84 s → 2.44-2.51 s per image. Kernels are summed in float64, then stored
    in the block's dtype.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        conv = block.conv
        out_channels, in_channels = conv.weight.shape[:2]
        taps = torch.tensor(_PHASE_TAPS, dtype=torch.float64)
        # kernel[a, b, o, i, t, s]: phase (a, b)'s 2x2 kernel from output channel o to input channel i
        kernel = torch.einsum("atk,oikl,bsl->aboits", taps, conv.weight.detach().double(), taps)
        if block.shortcut:
            # Output channel o, phase (a, b) copies input channel (4o + 2a + b) // repeats at low-res pixel
            # (i, j): the tap (1 - a, 1 - b) of its kernel (phase 0 reads rows i-1, i; phase 1 rows i, i+1).
            o = torch.arange(out_channels)
            for a in (0, 1):
                for b in (0, 1):
                    kernel[a, b, o, (4 * o + 2 * a + b) // block.repeats, 1 - a, 1 - b] += 1.0
        # pixel_shuffle's channel order is o·4 + 2·slot_a + slot_b, with slot = 1 - phase.
        kernel = kernel.flip(0, 1).permute(2, 0, 1, 3, 4, 5).reshape(4 * out_channels, in_channels, 2, 2)
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, 2, 1, 1, bias=conv.bias is not None,
                              device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(kernel)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach().repeat_interleave(4))

    def forward(self, x):
        height, width = x.shape[2], x.shape[3]
        return F.pixel_shuffle(self.conv(x), 2)[:, :, 1:2 * height + 1, 1:2 * width + 1]


def sub_pixel_upsampling(module: nn.Module) -> int:
    """Replace every nearest-interpolating DCUpBlock2d under `module` by SubPixelUpBlock. Returns the count."""
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, DCUpBlock2d) and child.interpolate and child.interpolation_mode == "nearest"]
    for parent, name, child in targets:
        setattr(parent, name, SubPixelUpBlock(child))
    return len(targets)


class VaeDecoderWrapper(nn.Module):
    """AutoencoderDC.decode(latent) -> sample. The caller divides by scaling_factor first."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        channels_first_rms_norms(vae.decoder)
        sub_pixel_upsampling(vae.decoder)

    def forward(self, latent):
        return (self.vae.decode(latent, return_dict=False)[0],)


class VaeEncoderWrapper(nn.Module):
    """AutoencoderDC.encode(sample) -> latent (deterministic: DC-AE has no posterior sampling). The
    caller multiplies the latent by scaling_factor and sigma_data."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        channels_first_rms_norms(vae.encoder)

    def forward(self, sample):
        return (self.vae.encode(sample, return_dict=False)[0],)
