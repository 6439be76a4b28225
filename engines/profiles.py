"""Shape profiles, derived from the component specs.

A profile gives each dynamic dim of a component a (min, opt, max). ONNX Runtime engines take the
spec's full ranges. TensorRT engines are tuned for a profile, so theirs is as narrow as the use:
batch 1..max_batch (opt 1); latent sizes spanning every 1024 resolution bin (and the 512 bins;
sprintrt/bins.py); the text length of the transformer fixed by max_sequence_length (the pipeline pads to it), the
text encoder's from one token up to that padded length (the pipeline runs the encoder on the real
tokens only, after the instruction's cached prefix, whose length is the past's). A static profile
(one batch, one size) is what CUDA graphs need.
"""

from __future__ import annotations

from dataclasses import dataclass

from sprintrt import defaults as D
from sprintrt import specs as S
from sprintrt.bins import TABLES
from sprintrt.errors import InvalidInputError


@dataclass(frozen=True)
class ProfileOptions:
    max_batch: int = D.DEFAULT_MAX_BATCH
    max_sequence_length: int = D.DEFAULT_MAX_SEQUENCE_LENGTH
    complex_human_instruction: bool = True
    static: tuple[int, int, int] | None = None  # (batch, height px, width px): one shape only
    resolutions: tuple[str, ...] = tuple(TABLES)  # which bin tables the latent range must cover


def bin_latent_range(model: S.ModelDims, resolutions=tuple(TABLES)) -> tuple[int, int]:
    sides = [side for r in resolutions for hw in TABLES[r].values() for side in hw]
    f = model.vae_scale_factor
    return min(sides) // f, max(sides) // f


def text_length(model: S.ModelDims, opts: ProfileOptions) -> int:
    return D.tokenized_length(opts.max_sequence_length, model.chi_tokens if opts.complex_human_instruction else None)


# A typical prompt's token count, where the text-encoder profile is tuned (opt).
TYPICAL_PROMPT_TOKENS = 48


def _text_len_range(model: S.ModelDims, opts: ProfileOptions) -> tuple[int, int, int]:
    """The text encoder sees the padded length at most, and as little as one token: the pipeline runs it
    on the real tokens only (the padding cannot change the images), after the instruction's cached prefix,
    so the length varies per call and is typically a prompt's own tokens."""
    longest = text_length(model, opts)
    return 1, min(longest, TYPICAL_PROMPT_TOKENS), longest


def _past_len_range(model: S.ModelDims, opts: ProfileOptions) -> tuple[int, int, int]:
    """One masked slot without an instruction; its tokens (the cached prefix) with one."""
    chi = model.chi_tokens if opts.complex_human_instruction else 0
    return 1, max(chi, 1), max(chi, 1)


def full_profile(spec: S.ComponentSpec) -> dict[str, dict]:
    """The spec's own ranges (what ONNX Runtime accepts)."""
    return {n: {"min": d.min, "opt": d.opt, "max": d.max} for n, d in spec.dims().items()}


def tensorrt_profile(spec: S.ComponentSpec, model: S.ModelDims, opts: ProfileOptions) -> dict[str, dict]:
    """The narrow profile a TensorRT engine of this component is built for."""
    if not 1 <= opts.max_batch <= model.max_batch:
        raise InvalidInputError(f"max_batch={opts.max_batch} is not allowed: expected [1, {model.max_batch}]. "
                                "Fix: pass a smaller --max-batch")
    if not 1 <= opts.max_sequence_length <= D.MAX_SEQUENCE_LENGTH_LIMIT:
        raise InvalidInputError(f"max_sequence_length={opts.max_sequence_length} is not allowed: expected "
                                f"[1, {D.MAX_SEQUENCE_LENGTH_LIMIT}]. Fix: use the default {D.DEFAULT_MAX_SEQUENCE_LENGTH}")
    lo, hi = bin_latent_range(model, opts.resolutions)
    opt = 1024 // model.vae_scale_factor  # the pipeline's default 1024 x 1024
    ranges = {"batch": (1, 1, opts.max_batch), "latent_height": (lo, opt, hi), "latent_width": (lo, opt, hi),
              "text_len": _text_len_range(model, opts), "past_len": _past_len_range(model, opts),
              "text_seq": (opts.max_sequence_length,) * 3}
    if opts.static is not None:
        batch, height, width = opts.static
        f = model.vae_scale_factor
        if height % f or width % f or not (1 <= batch <= model.max_batch):
            raise InvalidInputError(f"static={opts.static} is not allowed: expected (batch in [1, {model.max_batch}], "
                                    f"height and width multiples of {f}). Fix: e.g. --static 1x1024x1024")
        ranges.update(batch=(batch,) * 3, latent_height=(height // f,) * 3, latent_width=(width // f,) * 3)
    profile = {}
    for name, dim in spec.dims().items():
        mn, opt, mx = ranges[name]
        mn, mx = max(mn, dim.min), min(mx, dim.max)
        profile[name] = {"min": mn, "opt": min(max(opt, mn), mx), "max": mx}
    return profile


def input_shapes(spec: S.ComponentSpec, profile: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per input tensor, its min/opt/max shapes under a dim profile (what a TensorRT profile takes)."""
    return {t.name: {k: t.shape({n: d[k] for n, d in profile.items()}) for k in ("min", "opt", "max")}
            for t in spec.inputs}
