"""The components and one declarative spec per component: tensor names, dtypes and dims with named ranges.

The contract between export/ (which traces each component to this interface), engines/ (which builds
engines with these inputs and profiles) and runtime/ (which feeds them). Everything shape-related is
derived from these specs: the exporter's dynamic axes, the sample inputs used to trace, the validation
shapes (always other than the trace shape), the runtime's input checks, TensorRT optimization profiles
and the manifest's I/O description. No shape formula is written twice.

Pure data: stdlib + numpy only, so the runtime can import it on a box without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, NamedTuple

import numpy as np

from sprintrt.defaults import DEFAULT_MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH_LIMIT
from sprintrt.errors import InvalidInputError

TEXT_ENCODER = "text_encoder"
TRANSFORMER = "transformer"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
# ControlNet: the ControlNet branch (SanaControlNetModel: residuals from the latents, the prompt and the
# control image's latent) and the transformer that adds them (the same weights as `transformer`, one more
# input). A second transformer graph keeps the text-to-image graph, its engines and its speed unchanged.
CONTROLNET = "controlnet"
CONTROLLED_TRANSFORMER = "controlled_transformer"
COMPONENTS = (TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER, CONTROLNET, CONTROLLED_TRANSFORMER)
# What each pipeline runs: text to image needs no encoder; image to image encodes its input image; ControlNet
# encodes the control image and runs the ControlNet branch and the controlled transformer each step.
TEXT_TO_IMAGE = (TEXT_ENCODER, TRANSFORMER, VAE_DECODER)
IMAGE_TO_IMAGE = (TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER)
CONTROLNET_TO_IMAGE = (TEXT_ENCODER, CONTROLNET, CONTROLLED_TRANSFORMER, VAE_DECODER, VAE_ENCODER)
# Components made of SANA transformer blocks: the same precisions, islands and int8 recipe apply to each.
TRANSFORMER_FAMILY = (TRANSFORMER, CONTROLNET, CONTROLLED_TRANSFORMER)
# Components whose output is the picture, and its value range (peak to peak) for a PSNR: the decoder writes
# pixels in about [-1, 1] (the image is output / 2 + 0.5). Quality gates on them ask a PSNR besides a cosine.
PICTURE_OUTPUT_RANGE = {VAE_DECODER: 2.0}
# What a checkpoint needs to have for a component to be exported (a ControlNet is optional).
OPTIONAL_COMPONENTS = (CONTROLNET, CONTROLLED_TRANSFORMER)


@dataclass(frozen=True)
class Dim:
    """A named dynamic axis. min/opt/max bound the engine; sample is the trace size; probes validate."""

    name: str
    min: int
    opt: int
    max: int
    # Trace with a size >= 2 so the exporter cannot specialise the axis to 0/1.
    sample: int
    # Validation sizes: never the trace size, so a graph that baked in the trace shape fails.
    probes: tuple[int, ...]

    def __post_init__(self):
        if not (self.min <= self.opt <= self.max and self.min <= self.sample <= self.max):
            raise ValueError(f"Dim {self.name}: need min <= opt, sample <= max, got {self}")
        if self.sample in self.probes or not all(self.min <= p <= self.max for p in self.probes):
            raise ValueError(f"Dim {self.name}: probes must lie in [min, max] and differ from sample, got {self}")


class Bounds(NamedTuple):
    """The (min, opt, max) of one dim in a built engine's profile."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Scaled:
    """An axis that is a fixed multiple of a Dim (the VAE's pixels per latent): the decoder's output
    and the encoder's input are `latent size x factor` pixels."""

    dim: Dim
    factor: int


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `values` says what a realistic sample of this tensor looks like."""

    name: str
    dtype: str
    dims: tuple  # each an int, a Dim, or a Scaled
    values: str = "normal"  # normal | token_ids | padding_mask | unit_interval | guidance | image
    high: int = 0  # exclusive upper bound for token_ids

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for d in self.dims:
            if isinstance(d, Dim):
                out.append(sizes[d.name])
            elif isinstance(d, Scaled):
                out.append(sizes[d.dim.name] * d.factor)
            else:
                out.append(int(d))
        return tuple(out)

    def dim_names(self) -> list:
        """JSON-friendly dims: ints stay ints, dynamic axes become their names."""
        names = []
        for d in self.dims:
            if isinstance(d, Dim):
                names.append(d.name)
            elif isinstance(d, Scaled):
                names.append(f"{d.dim.name}*{d.factor}")
            else:
                names.append(int(d))
        return names


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: str = ""

    # ---- derived views -------------------------------------------------------------------
    def dims(self) -> dict[str, Dim]:
        """Every dynamic Dim of the inputs, by name, in first-use order."""
        found: dict[str, Dim] = {}
        for t in self.inputs:
            for d in t.dims:
                d = d.dim if isinstance(d, Scaled) else d
                if isinstance(d, Dim):
                    found.setdefault(d.name, d)
        return found

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def sizes(self, which: str = "sample", **overrides: int) -> dict[str, int]:
        """A full assignment of dim sizes: 'sample', 'opt', 'min' or 'max', with overrides."""
        sizes = {n: getattr(d, which) for n, d in self.dims().items()}
        sizes.update(overrides)
        return sizes

    def shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(sizes) for t in self.inputs}

    def output_shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(sizes) for t in self.outputs}

    def validation_sizes(self) -> list[dict[str, int]]:
        """Size assignments to validate an export at, none equal to the trace sizes.

        The k-th assignment takes each dim's k-th probe (cycling), so every probe is used and
        the dims vary together (batch and sequence at once, not one axis at a time)."""
        dims = self.dims()
        count = max(len(d.probes) for d in dims.values())
        return [{n: d.probes[k % len(d.probes)] for n, d in dims.items()} for k in range(count)]

    def sample_inputs(self, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Realistic random inputs at the given sizes (right-padded masks, timesteps in [0, 1])."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape = t.shape(sizes)
            if t.values == "token_ids":
                arr = rng.integers(0, t.high, size=shape)
            elif t.values == "padding_mask":
                # Right padding as the tokenizer makes it: row i keeps a random prefix of length >= 1.
                arr = np.zeros(shape)
                for row in range(shape[0]):
                    arr[row, : int(rng.integers(1, shape[1] + 1))] = 1
            elif t.values == "unit_interval":
                arr = rng.uniform(0.0, 1.0, size=shape)
            elif t.values == "guidance":
                arr = rng.uniform(0.3, 0.6, size=shape)
            elif t.values == "image":
                arr = rng.uniform(-1.0, 1.0, size=shape)
            else:
                arr = rng.standard_normal(size=shape)
            feeds[t.name] = arr.astype(t.dtype)
        return feeds

    def check_feeds(self, feeds: Mapping[str, np.ndarray], limits: Mapping[str, "Dim | Bounds"] | None = None) -> None:
        """Raise InvalidInputError naming the tensor, the axis and the allowed range."""
        limits = dict(limits or self.dims())
        seen: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in feeds:
                raise InvalidInputError(f"{self.name}: input '{t.name}' is missing; expected inputs {[i.name for i in self.inputs]}")
            arr = feeds[t.name]
            if arr.ndim != len(t.dims):
                raise InvalidInputError(
                    f"{self.name}: input '{t.name}' has rank {arr.ndim}, expected {len(t.dims)} with dims {t.dim_names()}")
            if np.dtype(arr.dtype) != np.dtype(t.dtype):
                raise InvalidInputError(f"{self.name}: input '{t.name}' has dtype {arr.dtype}, expected {t.dtype}")
            for axis, (d, size) in enumerate(zip(t.dims, arr.shape)):
                factor = 1
                if isinstance(d, Scaled):
                    d, factor = d.dim, d.factor
                    if size % factor:
                        raise InvalidInputError(
                            f"{self.name}: input '{t.name}' axis {axis} is {size}, expected a multiple of {factor} "
                            f"({d.name} x {factor}). Fix: resize to a multiple of {factor}")
                if isinstance(d, Dim):
                    lim, size = limits[d.name], size // factor
                    if not lim.min <= size <= lim.max:
                        raise InvalidInputError(
                            f"{self.name}: input '{t.name}' axis {axis} ({d.name}) is {size * factor}"
                            f"{f' ({size} x {factor})' if factor > 1 else ''}, allowed range is [{lim.min * factor}, "
                            f"{lim.max * factor}]. Fix: stay inside the engine's profile or rebuild it with a wider one.")
                    if seen.setdefault(d.name, size) != size:
                        raise InvalidInputError(
                            f"{self.name}: {d.name} is {seen[d.name]} in one input and {size} in '{t.name}'; they must agree")
                elif size != d:
                    raise InvalidInputError(f"{self.name}: input '{t.name}' axis {axis} is {size}, expected {d}")

    def to_json(self) -> dict:
        def tensor(t: TensorSpec) -> dict:
            return {"name": t.name, "dtype": t.dtype, "dims": t.dim_names()}

        return {
            "name": self.name,
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
            "dims": {n: {k: v for k, v in asdict(d).items() if k != "name"} for n, d in self.dims().items()},
        }


# ---- the model facts a spec depends on ---------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    """The few numbers of a checkpoint that fix its I/O shapes (read from its configs)."""

    vocab_size: int
    text_hidden: int  # Gemma2 hidden size == transformer caption_channels
    latent_channels: int
    vae_scale_factor: int  # pixels per latent: 2 ** (VAE stages - 1), as SanaSprintPipeline computes it
    text_len_max: int  # longest tokenized text: tokenized_length(MAX_SEQUENCE_LENGTH_LIMIT, chi_tokens)
    # Gemma2's key/value cache layout [layers, 2, batch, kv_heads, positions, head_dim] (text_encoder_spec)
    text_layers: int
    text_kv_heads: int
    text_head_dim: int
    chi_tokens: int = 0  # tokens of the default complex human instruction, <bos> included
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    max_batch: int = 8
    # The ControlNet's residuals: one [batch, latent h, latent w, hidden] tensor per ControlNet block (0: no
    # ControlNet), hidden = the transformer's inner dim (heads x head dim).
    controlnet_blocks: int = 0
    transformer_hidden: int = 0
    # One latent pixel and up, as diffusers (ONNX Runtime and OpenVINO run any size); only a TensorRT
    # profile narrows the range (engines/profiles.py).
    latent_min: int = 1
    latent_max: int = 128  # 4096 px at f32: covers every bin of sprintrt/bins.py (max 2048 px)

    @classmethod
    def from_json(cls, d: Mapping) -> "ModelDims":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PipelineConstants:
    """The scalars of a checkpoint the runtime's math needs besides ModelDims (scheduler and VAE configs)."""

    sigma_data: float  # scheduler_config.sigma_data
    guidance_embeds_scale: float  # transformer config: guidance is multiplied by it before embedding
    sample_size: int  # transformer config: 32 for the 1024 px models (resolution binning needs it)
    vae_scaling_factor: float  # latents / this go into the decoder

    @classmethod
    def from_json(cls, d: Mapping) -> "PipelineConstants":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _batch(m: ModelDims) -> Dim:
    return Dim("batch", 1, 1, m.max_batch, sample=2, probes=(1, 3))


def _latent(m: ModelDims, name: str, sample: int, probes: tuple[int, ...]) -> Dim:
    return Dim(name, m.latent_min, 32, m.latent_max, sample=sample, probes=probes)


def text_encoder_spec(m: ModelDims) -> ComponentSpec:
    """Gemma2 over new tokens after cached ones (the instruction prefix, see runtime/text_prefix.py).

    past_key_values holds the keys and values of `past_len` earlier positions, past_attention_mask says
    which of them are real (1) or placeholders (0: a masked slot stands for "no prefix", the graph has no
    empty axis). The new tokens' positions continue after the real past ones. present_key_values are the
    new tokens' keys and values, to be passed as the past of a later call.
    """
    seq = Dim("text_len", 1, min(DEFAULT_MAX_SEQUENCE_LENGTH, m.text_len_max), m.text_len_max, sample=16,
              probes=(7, 37))
    past = Dim("past_len", 1, max(m.chi_tokens, 1), m.text_len_max, sample=5, probes=(3, 11))
    b = _batch(m)
    kv = (m.text_layers, 2, b)
    return ComponentSpec(
        TEXT_ENCODER,
        inputs=(
            TensorSpec("input_ids", "int64", (b, seq), values="token_ids", high=m.vocab_size),
            TensorSpec("attention_mask", "int64", (b, seq), values="padding_mask"),
            TensorSpec("past_key_values", "float32", kv + (m.text_kv_heads, past, m.text_head_dim)),
            TensorSpec("past_attention_mask", "int64", (b, past), values="padding_mask"),
        ),
        outputs=(TensorSpec("last_hidden_state", "float32", (b, seq, m.text_hidden)),
                 TensorSpec("present_key_values", "float32", kv + (m.text_kv_heads, seq, m.text_head_dim))),
        notes="Gemma2Model decoder with a key/value past, eager attention (keeps logit soft-capping); "
              "last_hidden_state is after the final RMSNorm.",
    )


def transformer_spec(m: ModelDims) -> ComponentSpec:
    b = _batch(m)
    seq = Dim("text_seq", 1, m.max_sequence_length, MAX_SEQUENCE_LENGTH_LIMIT, sample=16, probes=(5, 33))
    h = _latent(m, "latent_height", sample=8, probes=(5, 12))
    w = _latent(m, "latent_width", sample=6, probes=(9, 4))
    return ComponentSpec(
        TRANSFORMER,
        inputs=(
            TensorSpec("hidden_states", "float32", (b, m.latent_channels, h, w)),
            TensorSpec("encoder_hidden_states", "float32", (b, seq, m.text_hidden)),
            TensorSpec("encoder_attention_mask", "int64", (b, seq), values="padding_mask"),
            TensorSpec("timestep", "float32", (b,), values="unit_interval"),
            TensorSpec("guidance", "float32", (b,), values="guidance"),
        ),
        outputs=(TensorSpec("noise_pred", "float32", (b, m.latent_channels, h, w)),),
        notes="SanaTransformer2DModel forward only; the TrigFlow in/out conversion runs in the NumPy scheduler.",
    )


def vae_decoder_spec(m: ModelDims) -> ComponentSpec:
    b = _batch(m)
    h = _latent(m, "latent_height", sample=5, probes=(4, 7))
    w = _latent(m, "latent_width", sample=4, probes=(6, 5))
    return ComponentSpec(
        VAE_DECODER,
        inputs=(TensorSpec("latent", "float32", (b, m.latent_channels, h, w)),),
        outputs=(TensorSpec("sample", "float32", (b, 3, Scaled(h, m.vae_scale_factor), Scaled(w, m.vae_scale_factor))),),
        notes="AutoencoderDC.decode; input is latents / scaling_factor, output is in about [-1, 1], unclamped.",
    )


def vae_encoder_spec(m: ModelDims) -> ComponentSpec:
    b = _batch(m)
    h = _latent(m, "latent_height", sample=5, probes=(4, 7))
    w = _latent(m, "latent_width", sample=4, probes=(6, 5))
    f = m.vae_scale_factor
    return ComponentSpec(
        VAE_ENCODER,
        inputs=(TensorSpec("sample", "float32", (b, 3, Scaled(h, f), Scaled(w, f)), values="image"),),
        outputs=(TensorSpec("latent", "float32", (b, m.latent_channels, h, w)),),
        notes="AutoencoderDC.encode(sample).latent; input is the image in [-1, 1], output unscaled (the pipeline "
              "multiplies it by scaling_factor and sigma_data).",
    )


def _block_samples(m: ModelDims, b: Dim, h: Dim, w: Dim) -> TensorSpec:
    """The ControlNet residuals, stacked: [blocks, batch, latent h, latent w, hidden]. The blocks' tokens are
    the latent pixels in row-major order, so [h, w] is their [h·w] token axis without a copy."""
    return TensorSpec("block_samples", "float32", (m.controlnet_blocks, b, h, w, m.transformer_hidden))


def controlnet_spec(m: ModelDims) -> ComponentSpec:
    """The transformer's inputs less guidance (the ControlNet has no guidance embedding), plus the control latent
    (shaped as the latents) and the scale per image and block."""
    plain = transformer_spec(m)
    latents, text, mask, timestep = (plain.input(n) for n in ("hidden_states", "encoder_hidden_states",
                                                               "encoder_attention_mask", "timestep"))
    b, _, h, w = latents.dims
    return ComponentSpec(
        CONTROLNET,
        inputs=(
            latents, text, mask, timestep,
            TensorSpec("controlnet_cond", "float32", latents.dims),
            TensorSpec("conditioning_scale", "float32", (b, m.controlnet_blocks), values="unit_interval"),
        ),
        outputs=(_block_samples(m, b, h, w),),
        notes="SanaControlNetModel forward; controlnet_cond is the control image's VAE latent x scaling_factor; "
              "block_samples[k] = the k-th ControlNet block's residual x conditioning_scale[:, k].",
    )


def controlled_transformer_spec(m: ModelDims) -> ComponentSpec:
    plain = transformer_spec(m)
    b, _, h, w = plain.inputs[0].dims
    return ComponentSpec(
        CONTROLLED_TRANSFORMER,
        inputs=(*plain.inputs, _block_samples(m, b, h, w)),
        outputs=plain.outputs,
        notes="SanaTransformer2DModel forward with controlnet_block_samples: block_samples[k-1] is added after "
              "transformer block k (k = 1..blocks), as diffusers does.",
    )


SPEC_BUILDERS = {TEXT_ENCODER: text_encoder_spec, TRANSFORMER: transformer_spec, VAE_DECODER: vae_decoder_spec,
                 VAE_ENCODER: vae_encoder_spec, CONTROLNET: controlnet_spec,
                 CONTROLLED_TRANSFORMER: controlled_transformer_spec}


def component_specs(m: ModelDims) -> dict[str, ComponentSpec]:
    """The specs of every component this model has (the ControlNet ones only with a ControlNet)."""
    return {name: build(m) for name, build in SPEC_BUILDERS.items()
            if name not in OPTIONAL_COMPONENTS or m.controlnet_blocks}
