"""Seeded random SANA-Sprint checkpoints in the real diffusers layout, and the real loading path.

`make_checkpoint(out, arch, seed)` writes model_index.json, scheduler/, text_encoder/, tokenizer/,
transformer/ and vae/ exactly as `SanaSprintPipeline.save_pretrained` does, so everything downstream
loads them through `from_pretrained`, the same call that loads a released checkpoint or a hub id.

Architectures: `tiny` (seconds to export and run; the test and demo default) and the released
`0.6B` / `1.6B` transformers with Gemma2-2B and DC-AE f32c32 (random weights, for scale work). The
text encoders use the offline tokenizer's small vocabulary instead of Gemma's 256000 rows: the
embedding is a gather whose cost does not depend on the vocabulary size.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

from sprintrt.defaults import ARCHS, DEFAULT_ARCH, DEFAULT_SEED
from sprintrt.errors import InvalidInputError, ModelLoadError

# The sprint flags shared by every architecture (docs/SANA_SPRINT_SPEC.md §6.2).
_SPRINT_TRANSFORMER = dict(
    in_channels=32, out_channels=32, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None, qk_norm="rms_norm_across_heads",
    guidance_embeds=True, guidance_embeds_scale=0.1, timestep_scale=1.0,
)

_TINY_TRANSFORMER = dict(
    _SPRINT_TRANSFORMER, num_layers=2, num_attention_heads=2, attention_head_dim=8,
    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
)

# Same block structure as DC-AE f32c32 (six stages, so a 32x upsampling; ResBlocks then EfficientViT
# blocks), with narrow channels and one layer per stage. The last stage keeps 32 channels = the
# latent channels: the decoder's in-shortcut repeats latent channels (width / 32) times.
_TINY_VAE = dict(
    in_channels=3, latent_channels=32, attention_head_dim=8,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[8, 8, 16, 16, 32, 32], decoder_block_out_channels=[8, 8, 16, 16, 32, 32],
    encoder_layers_per_block=[1] * 6, decoder_layers_per_block=[1] * 6,
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)

_TINY_GEMMA = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=8192, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
    hidden_activation="gelu_pytorch_tanh",
)


# diffusers' SanaControlNetModel takes these of the transformer's config; the block count is its own
# (NVlabs' SANA ControlNets copy the first 7 of the transformer's blocks; the tiny one copies 1 of 2: a
# residual is added after block k = 1..blocks, so blocks must stay below the transformer's layers).
_CONTROLNET_FROM_TRANSFORMER = (
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_cross_attention_heads",
    "cross_attention_head_dim", "cross_attention_dim", "caption_channels", "mlp_ratio", "attention_bias",
    "sample_size", "patch_size", "norm_elementwise_affine", "norm_eps", "interpolation_scale")
CONTROLNET_BLOCKS = {"tiny": 1, "0.6B": 7, "1.6B": 7}


def controlnet_config(transformer: dict, blocks: int) -> dict:
    """A SanaControlNetModel config with the transformer's dims and `blocks` blocks."""
    return {**{k: transformer[k] for k in _CONTROLNET_FROM_TRANSFORMER if k in transformer}, "num_layers": blocks}


def real_configs() -> dict:
    """The released architectures, shipped in export/data/real_configs.json."""
    text = resources.files("sprintrt.export").joinpath("data/real_configs.json").read_text()
    return {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in json.loads(text).items()
            if not k.startswith("_")}


def arch_configs(arch: str) -> dict:
    """Configs (transformer, vae, text_encoder) of an architecture name."""
    if arch not in ARCHS:
        raise InvalidInputError(f"arch={arch!r} is not known: expected one of {ARCHS}. Fix: pass --arch tiny, 0.6B or 1.6B")
    if arch == "tiny":
        cfg = {"transformer": dict(_TINY_TRANSFORMER), "vae": dict(_TINY_VAE), "text_encoder": dict(_TINY_GEMMA)}
    else:
        real = real_configs()
        gemma = {k: v for k, v in real["text_encoder_gemma2_2b"].items() if k not in ("vocab_size", "attn_implementation")}
        cfg = {"transformer": dict(_SPRINT_TRANSFORMER, **real[f"transformer_{arch}"]),
               "vae": dict(real["vae_dc_ae_f32c32_sana_1_1"]), "text_encoder": gemma}
    cfg["controlnet"] = controlnet_config(cfg["transformer"], CONTROLNET_BLOCKS[arch])
    return cfg


def make_checkpoint(out: str | Path, arch: str = DEFAULT_ARCH, seed: int = DEFAULT_SEED,
                    controlnet: bool = False) -> Path:
    """Write a seeded random checkpoint of `arch` to `out` in the diffusers layout. Returns `out`.

    Args:
        out: target directory; it must not hold a checkpoint already (nothing is overwritten).
        arch: "tiny", "0.6B" or "1.6B".
        seed: torch seed; the same seed gives the same weights.
        controlnet: also write a seeded random SanaControlNetModel with the transformer's dims in
            `controlnet/` (the layout `sprintrt export` reads a ControlNet from).
    """
    import torch
    from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model

    from sprintrt.export.tokenizer import build_tokenizer

    cfg = arch_configs(arch)
    out = Path(out)
    if (out / "model_index.json").exists():
        raise InvalidInputError(f"out={str(out)!r} already holds a checkpoint. Fix: choose an empty directory or delete it first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"out={str(out)!r} exists and is not an empty directory. Fix: choose a new or empty "
                                "directory (nothing there was touched)")

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**cfg["transformer"]).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(**cfg["vae"]).eval()
    torch.manual_seed(seed + 2)
    gemma_cfg = Gemma2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             **cfg["text_encoder"])
    gemma_cfg._attn_implementation = "eager"  # soft-capping lives only in eager attention (docs/SANA_SPRINT_SPEC.md §9.3)
    text_encoder = Gemma2Model(gemma_cfg).eval()
    _widen_random_init((text_encoder, transformer), seed + 3)
    scheduler = SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    pipe = SanaSprintPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                              transformer=transformer, scheduler=scheduler)
    # Written under a name of this process's own, then renamed: never a half checkpoint at `out`, and two runs
    # for the same `out` never write into one directory (a shared ".partial" did; the loser's rename then failed
    # with a traceback, and a crashed run's leftovers, a controlnet/ among them, went into the next checkpoint).
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if controlnet:
            from diffusers import SanaControlNetModel

            torch.manual_seed(seed + 4)
            net = SanaControlNetModel(**cfg["controlnet"]).eval()
            _widen_random_init((net,), seed + 5)
            net.save_pretrained(tmp / CONTROLNET_FOLDER, safe_serialization=True)
        try:
            tmp.rename(out)  # onto a missing or empty directory only
        except OSError as exc:
            raise InvalidInputError(f"out={str(out)!r} was filled by another process while this checkpoint was "
                                    f"written ({exc.strerror}). Fix: choose a new or empty directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _widen_random_init(modules, seed: int) -> None:
    """Give the random weights real-model magnitudes so parity tests see non-trivial activations.

    Default inits leave Gemma2's RMSNorm weights at 0 (scale 1+w = 1), SANA's zero-initialised
    output layers at exactly 0, which would make the transformer output constant and hide errors, and
    the ControlNet's zero-initialised input and output projections at 0 (it would add exactly nothing).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if p.abs().max() == 0 or name.endswith("norm.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0.0 if p.abs().max() == 0 else p))


def load_pipeline(model: str | Path, torch_dtype=None):
    """Load SanaSprintPipeline through the real from_pretrained path (local dir or hub id)."""
    import torch
    from diffusers import SanaSprintPipeline

    # diffusers >= 0.42 names the argument `dtype` (`torch_dtype` is deprecated); float32 is the default.
    kwargs = {} if torch_dtype in (None, torch.float32) else {"dtype": torch_dtype}
    try:
        pipe = SanaSprintPipeline.from_pretrained(str(model), **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(
            f"cannot load a SANA-Sprint checkpoint from {str(model)!r}: {e}. Fix: pass a diffusers checkpoint "
            "directory (with model_index.json) or a hub id, or make one with `sprintrt make-checkpoint`") from e
    # Gemma2 must run eager attention: SDPA drops the logit soft-capping (docs/SANA_SPRINT_SPEC.md §9.3).
    pipe.text_encoder.config._attn_implementation = "eager"
    pipe.set_progress_bar_config(disable=True)
    return pipe


COMPONENT_FOLDERS = {"text_encoder": "text_encoder", "transformer": "transformer", "vae_decoder": "vae",
                     "vae_encoder": "vae", "controlnet": "controlnet", "controlled_transformer": "transformer"}
# Where a checkpoint keeps its ControlNet (the folder `make-checkpoint --controlnet` writes).
CONTROLNET_FOLDER = "controlnet"


def load_component(src: str | Path, component: str, torch_dtype=None, vae_dir: str | Path | None = None,
                   controlnet_dir: str | Path | None = None):
    """One network of a checkpoint directory, loaded alone through its from_pretrained (export loads
    the components one at a time, so peak memory is one network, not the whole pipeline). `vae_dir`
    is a replacement AutoencoderDC directory for the VAE decoder; `controlnet_dir` the SanaControlNetModel
    directory (default: the checkpoint's controlnet/)."""
    import torch
    from diffusers import AutoencoderDC, SanaControlNetModel, SanaTransformer2DModel
    from transformers import Gemma2Model

    src, dtype = Path(src), torch_dtype or torch.float32
    try:
        if component == "text_encoder":
            # eager attention: SDPA drops Gemma2's logit soft-capping (docs/SANA_SPRINT_SPEC.md §9.3)
            model = Gemma2Model.from_pretrained(src / "text_encoder", dtype=dtype, attn_implementation="eager")
        elif component == "controlnet":
            model = SanaControlNetModel.from_pretrained(controlnet_dir or src / CONTROLNET_FOLDER, torch_dtype=dtype)
        elif component in ("transformer", "controlled_transformer"):
            model = SanaTransformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype)
        elif component in ("vae_decoder", "vae_encoder") and vae_dir is not None:
            model = AutoencoderDC.from_pretrained(vae_dir, torch_dtype=dtype)
        elif component in ("vae_decoder", "vae_encoder"):
            model = AutoencoderDC.from_pretrained(src, subfolder="vae", torch_dtype=dtype)
        else:
            raise InvalidInputError(f"component={component!r} is not known: expected one of "
                                    f"{list(COMPONENT_FOLDERS)}. Fix: name one of those")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {component} from {str(src)!r}: {e}. Fix: pass a complete diffusers "
                             "SanaSprintPipeline checkpoint") from e
    return model.eval()


def read_config(src: str | Path, folder: str, name: str = "config.json") -> dict:
    path = Path(src) / folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}. Fix: pass a complete diffusers checkpoint") from e


def load_tokenizer(src: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(src) / "tokenizer"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {str(src)!r}: {e}") from e
