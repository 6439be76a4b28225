"""SprintPipeline: encode → denoise → decode over engines, a drop-in for diffusers' SanaSprintPipeline.

Its call takes SanaSprintPipeline.__call__'s arguments with the same defaults and gives the same
images for the same weights and noise (pass a torch.Generator to replay diffusers' noise exactly).
Everything between the engine calls is NumPy float32 in diffusers' operation order
(docs/SANA_SPRINT_SPEC.md §1-§5).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sprintrt import defaults as D
from sprintrt import specs as S
from sprintrt.bins import classify_height_width_bin
from sprintrt.errors import CallCancelled, DeadlineExceeded, InvalidInputError, invalid, notice
from sprintrt.manifest import read_manifest
from sprintrt.runtime import image as I
from sprintrt.runtime import vae_decode as V
from sprintrt.runtime.call import TEXT_TO_IMAGE, CallArguments, pipeline_call
from sprintrt.runtime.engine import RunOptions, profile_limits
from sprintrt.runtime.noise import noise_source
from sprintrt.runtime.prompt import PromptTokenizer, preprocess, select_index
from sprintrt.runtime.prompt_cache import PromptEmbeddingCache
from sprintrt.runtime.scheduler import SCMScheduler
from sprintrt.runtime.registry import check_engines, load_engines
from sprintrt.runtime.text_prefix import TextEncoderRunner

OUTPUT_TYPES = ("pil", "np", "latent")
# Stages timed once per step: their timings are a list, one entry per step.
PER_STEP_STAGES = ("transformer", "controlnet")
# What a callback_on_step_end may ask to see and replace (diffusers' `_callback_tensor_inputs`).
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")


@dataclass
class SprintPipelineOutput:
    images: object  # list of PIL images, NHWC float32 array, or NCHW latents
    timings: dict = field(default_factory=dict)  # seconds per stage; transformer is a list, one per step


class Clock:
    """Seconds per stage: `with clock("vae_decoder"): ...` adds the block's time to that stage."""

    def __init__(self):
        self.timings: dict = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            if stage in PER_STEP_STAGES:
                self.timings.setdefault(stage, []).append(seconds)
            else:
                self.timings[stage] = self.timings.get(stage, 0.0) + seconds


class SprintPipeline:
    """Text to image over engines; see the module docstring."""

    COMPONENTS = S.TEXT_TO_IMAGE  # the engines from_engines loads by default

    def __init__(self, engines: dict, tokenizer: PromptTokenizer, manifest):
        self.text_encoder = engines.get(S.TEXT_ENCODER)
        self.transformer = engines.get(S.TRANSFORMER)
        self.vae_decoder = engines.get(S.VAE_DECODER)
        self.vae_encoder = engines.get(S.VAE_ENCODER)
        self.controlnet = engines.get(S.CONTROLNET)
        self.controlled_transformer = engines.get(S.CONTROLLED_TRANSFORMER)
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.model_dims = S.ModelDims.from_json(manifest.data["model_dims"])
        self.constants = S.PipelineConstants.from_json(manifest.data["pipeline"])
        self.vae_scale_factor = self.model_dims.vae_scale_factor
        # Each loaded engine's shape profile, from the manifest (wrapped engines keep their limits).
        self.limits = {c: profile_limits(manifest, c) for c in engines}
        # Run the text encoder on the real tokens only (see _run_text_encoder); False feeds it the padding too.
        self.trim_padding = True
        # Compute the complex human instruction's text-encoder work once and reuse it for every prompt
        # (runtime/text_prefix.py); False runs the encoder over every token of every prompt.
        self.reuse_instruction_prefix = True
        self.prompt_cache: PromptEmbeddingCache | None = None  # opt-in: from_engines(prompt_cache=...)
        self.vae_slicing = False
        self.vae_tiling: V.Tiling | None = None
        self._interrupt = False  # a callback_on_step_end sets it to skip the remaining steps, as in diffusers
        self._calls = threading.local()  # per calling thread: the deadline of its current call (see deadline())
        te = manifest.components.get(S.TEXT_ENCODER, {})
        self._text_runner = (TextEncoderRunner(self.model_dims, self.limits[S.TEXT_ENCODER])
                             if S.TEXT_ENCODER in self.limits else None)
        self._encoder_id = f"{te.get('key', '')}:{te.get('sha256', '')}"

    @classmethod
    def from_engines(cls, engine_dir: str | Path, threads: int | None = None, expect_model: str | None = None,
                     verify_sha256: bool = False, components=None,
                     cuda_graph: bool = False,
                     prompt_cache: "PromptEmbeddingCache | int | None" = None) -> "SprintPipeline":
        """Load an engine directory written by `sprintrt build`.

        Args:
            engine_dir: the directory with manifest.json.
            threads: intra-op threads per engine (default: the backend's choice, or $SPRINTRT_THREADS).
            expect_model: the model identity (sha256) the engines must come from; None skips the check.
            verify_sha256: hash every engine file against the manifest (size is always checked).
            components: load a subset (e.g. without the VAE for output_type="latent"); default: what
                this pipeline runs (text to image: text encoder, transformer, VAE decoder).
            cuda_graph: GPU engines replay CUDA graphs at repeated shapes (static-profile engines).
            prompt_cache: reuse text-encoder outputs of repeated prompts: a PromptEmbeddingCache (may be
                shared between pipelines) or its size in prompts. Off by default.
        """
        if prompt_cache is not None and not isinstance(prompt_cache, PromptEmbeddingCache):
            prompt_cache = PromptEmbeddingCache(prompt_cache)
        options = RunOptions(threads=threads, cuda_graph=cuda_graph)  # checks threads before anything loads
        components = tuple(cls.COMPONENTS if components is None else components)
        manifest = read_manifest(engine_dir)
        check_engines(manifest, components, expect_model=expect_model, verify_sha256=verify_sha256)
        engines = load_engines(manifest, components, options)
        tokenizer = PromptTokenizer(manifest.root / manifest.data["tokenizer"])
        pipe = cls(engines, tokenizer, manifest)
        pipe.prompt_cache = prompt_cache
        return pipe

    # ---- engines by component name (wrappers such as recorders swap them in and out) --------------
    def engine(self, component: str):
        """The loaded engine of `component` (None if it was not loaded)."""
        if component not in S.COMPONENTS:
            raise invalid("component", component, f"one of {list(S.COMPONENTS)}", "name one of those")
        return getattr(self, component)  # the engines live in the attributes named after their components

    def set_engine(self, component: str, engine) -> None:
        """Replace the engine of a loaded component, e.g. by a wrapper that records its calls."""
        self.engine(component)
        setattr(self, component, engine)
        if component == S.TEXT_ENCODER and self._text_runner is not None:
            self._text_runner.clear()  # a prefix is cached per engine

    # ---- VAE memory switches (diffusers: pipe.vae.enable_slicing() / enable_tiling()) ---------------
    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time: the decoder's memory is one image's."""
        self.vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self.vae_slicing = False

    def enable_vae_tiling(self, tile_sample_min_height: int | None = None, tile_sample_min_width: int | None = None,
                          tile_sample_stride_height: int | None = None,
                          tile_sample_stride_width: int | None = None) -> None:
        """Decode large images in overlapping tiles, blended as AutoencoderDC.enable_tiling() does (defaults
        512 px tiles, 448 px stride). Each tile must fit the VAE engine's latent profile."""
        d = V.Tiling()
        tiling = V.Tiling(tile_sample_min_height or d.tile_sample_min_height,
                          tile_sample_min_width or d.tile_sample_min_width,
                          tile_sample_stride_height or d.tile_sample_stride_height,
                          tile_sample_stride_width or d.tile_sample_stride_width)
        tiling.check(self.vae_scale_factor)
        self.vae_tiling = tiling

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    # ---- the call -------------------------------------------------------------------------
    @pipeline_call(TEXT_TO_IMAGE)
    def __call__(self, args: CallArguments):
        """Generate images. Arguments and defaults are SanaSprintPipeline.__call__'s (runtime/call.py); `eta` is
        ignored there too. Returns SprintPipelineOutput(images, timings), or (images,) if return_dict is False."""
        return self._generate(self._start_from_noise, args)

    def _require(self, component: str, pipeline: str) -> None:
        if self.engine(component) is None:
            raise InvalidInputError(f"this call needs the {component} engine, which was not loaded. Fix: load it "
                                    f"(`{pipeline}.from_engines(dir)` loads what the call needs), or build it")

    @contextlib.contextmanager
    def deadline(self, at: float | None):
        """Calls in this block stop at the next stage boundary (before the text encoder, each transformer step
        and the VAE) once time.monotonic() passes `at`, raising DeadlineExceeded: a server frees the machine
        for the next request instead of finishing an answer nobody waits for. None: no deadline."""
        with self._per_call("deadline", at):
            yield

    @contextlib.contextmanager
    def cancel_when(self, cancelled):
        """Calls in this block stop at the next stage boundary once `cancelled()` is true, raising CallCancelled:
        an interactive page drops a request that a newer one (the user drew again) has made pointless."""
        with self._per_call("cancelled", cancelled):
            yield

    @contextlib.contextmanager
    def _per_call(self, name: str, value):
        """Set a per-thread call setting (read at each stage boundary) for the block, restoring it after."""
        before = getattr(self._calls, name, None)
        setattr(self._calls, name, value)
        try:
            yield
        finally:
            setattr(self._calls, name, before)

    def _check_deadline(self, stage: str) -> None:
        cancelled = getattr(self._calls, "cancelled", None)
        if cancelled is not None and cancelled():
            raise CallCancelled(f"the call was cancelled before {stage}")
        at = getattr(self._calls, "deadline", None)
        if at is not None and time.monotonic() > at:
            raise DeadlineExceeded(f"the call passed its deadline by {time.monotonic() - at:.2f} s and stopped before "
                                   f"{stage}. Fix: allow more time, or ask for fewer or smaller images")

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback_on_step_end to skip the remaining steps (as in diffusers)."""
        return self._interrupt

    def _start_from_noise(self, scheduler: SCMScheduler, shape: tuple, draw, latents, clock: Clock):
        """Text to image: the start is noise (or the caller's latents) times sigma_data, every step runs."""
        if latents is None:
            with clock("noise"):
                x = draw(shape)
        else:
            x = self._check_latents(latents, shape)
        return x * np.float32(self.constants.sigma_data), scheduler.steps()

    def _predict_flow(self, x_in, embeds, mask, timestep, guidance, clock: Clock) -> np.ndarray:
        """One transformer call: the flow (velocity) prediction of one TrigFlow step."""
        with clock("transformer"):
            return self.transformer(hidden_states=x_in, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                    timestep=timestep, guidance=guidance)["noise_pred"]

    def _generate(self, start, args: CallArguments, predict_flow=None):
        """The steps every SANA-Sprint pipeline shares; `start(scheduler, shape, draw, latents, clock)` gives
        the starting latents and the TrigFlow steps to run (text to image: noise and all of them);
        `predict_flow(x_in, embeds, mask, timestep, guidance, clock)` is each step's model call (default: the
        transformer; ControlNet: the ControlNet branch, then the controlled transformer)."""
        if predict_flow is None:
            self._require(S.TRANSFORMER, type(self).__name__)
            predict_flow = self._predict_flow
        clock = Clock()
        t_start = time.perf_counter()
        # 1. Check the arguments and bin the size (before any engine runs).
        (height, width), scheduler = self._check_call(args)
        orig_size = (height, width)
        if args.use_resolution_binning:
            height, width = classify_height_width_bin(height, width)
        callback, callback_inputs = args.callback_on_step_end, args.callback_on_step_end_tensor_inputs
        if callback is not None and hasattr(callback, "tensor_inputs"):  # diffusers' PipelineCallback objects
            callback_inputs = callback.tensor_inputs
        self._interrupt = False

        # 2. Encode the prompt.
        self._check_deadline(S.TEXT_ENCODER)
        embeds, mask = self.encode_prompt(args.prompt, args.num_images_per_prompt, args.prompt_embeds,
                                          args.prompt_attention_mask, args.max_sequence_length,
                                          args.complex_human_instruction, clock)

        # 3. Prepare the starting latents and the steps to run.
        batch = embeds.shape[0]
        f = self.vae_scale_factor
        shape = (batch, self.model_dims.latent_channels, height // f, width // f)
        draw = noise_source(args.generator, batch)
        x, steps = start(scheduler, shape, draw, args.latents, clock)
        guidance = np.full((batch,), np.float32(args.guidance_scale), dtype=np.float32) * np.float32(
            self.constants.guidance_embeds_scale)

        # 4. Denoise: one transformer call per TrigFlow step, noise drawn on every step (the last included).
        x0 = x
        for i, step in enumerate(steps):
            if self._interrupt:
                continue
            self._check_deadline(f"step {i + 1} of {len(steps)}")
            with clock("scheduler"):
                x_in = scheduler.model_input(x, step)
                timestep = np.full((batch,), step.sflow, dtype=np.float32)
            flow = predict_flow(x_in, embeds, mask, timestep, guidance, clock)
            with clock("noise"):
                noise = draw(shape)
            with clock("scheduler"):
                x, x0 = scheduler.step(x, x_in, flow, step, noise)
            if callback is not None:
                x, embeds = self._run_callback(callback, callback_inputs, i, step.t, x, embeds)
        out_latents = x0 / np.float32(self.constants.sigma_data)

        # 5. Decode, resize back to the requested size, post-process.
        if args.output_type == "latent":
            images = out_latents
        else:
            self._check_deadline(S.VAE_DECODER)
            images = self._decode(out_latents, orig_size if args.use_resolution_binning else None, args.output_type,
                                  clock)
        clock.timings["total"] = time.perf_counter() - t_start
        if not args.return_dict:
            return (images,)
        return SprintPipelineOutput(images=images, timings=clock.timings)

    def _run_callback(self, callback, names, i: int, t, latents: np.ndarray, embeds: np.ndarray):
        """diffusers' callback_on_step_end(pipe, step index, timestep, {name: tensor}) with NumPy arrays; the
        latents and prompt embeddings it returns replace the pipeline's."""
        out = callback(self, i, t, {n: {"latents": latents, "prompt_embeds": embeds}[n] for n in names}) or {}
        if "latents" in out:
            latents = self._check_latents(out["latents"], latents.shape, "callback_on_step_end's latents")
        if "prompt_embeds" in out:
            embeds = self._check_latents(out["prompt_embeds"], embeds.shape, "callback_on_step_end's prompt_embeds")
        return latents, embeds

    def decode_latents(self, latents: np.ndarray, output_type: str = "np"):
        """The images of latents a call gave with output_type="latent" (diffusers: `pipe.vae.decode(latents /
        scaling_factor)` and its image processor), through this pipeline's VAE decoder, slicing and tiling."""
        if output_type not in OUTPUT_TYPES[:2]:
            raise invalid("output_type", output_type, f"one of {OUTPUT_TYPES[:2]}", "pass output_type='pil' or 'np'")
        channels = self.model_dims.latent_channels
        shape = getattr(latents, "shape", None)
        if shape is None or len(shape) != 4 or shape[1] != channels:
            raise invalid("latents", shape, f"an array (batch, {channels}, height, width)",
                          "pass the latents of a call with output_type='latent'")
        return self._decode(np.asarray(latents, dtype=np.float32), None, output_type, Clock())

    def _decode(self, latents: np.ndarray, resize_to: tuple[int, int] | None, output_type: str, clock: Clock):
        if self.vae_decoder is None:
            raise InvalidInputError("output_type needs the VAE decoder, which was not loaded. Fix: load the "
                                    "pipeline with the vae_decoder component, or pass output_type='latent'")
        with clock("vae_decoder"):
            decoded = V.decode(self.vae_decoder, latents / np.float32(self.constants.vae_scaling_factor),
                               self.vae_scale_factor, self.vae_slicing, self.vae_tiling)
        with clock("postprocess"):
            if resize_to is not None:
                decoded = I.resize_and_crop(decoded, *resize_to)
            return I.postprocess(decoded, output_type)

    def encode_prompt(self, prompt, num_images_per_prompt=1, prompt_embeds=None, prompt_attention_mask=None,
                      max_sequence_length=D.DEFAULT_MAX_SEQUENCE_LENGTH, complex_human_instruction=None,
                      clock: Clock | None = None):
        """Prompt → (embeddings [B·n, N, D] float32, mask [B·n, N] int64), as diffusers' encode_prompt."""
        clock = clock or Clock()
        if prompt is not None and prompt_embeds is not None:
            raise InvalidInputError("pass either prompt or prompt_embeds, not both. Fix: drop one of them")
        if prompt_embeds is not None:
            if prompt_attention_mask is None:
                raise InvalidInputError("prompt_embeds needs prompt_attention_mask. Fix: pass the mask returned with them")
            embeds = np.asarray(prompt_embeds, dtype=np.float32)
            mask = np.asarray(prompt_attention_mask).astype(np.int64)
        else:
            if self.text_encoder is None:
                raise InvalidInputError("prompt needs the text encoder, which was not loaded. Fix: load it or pass "
                                        "prompt_embeds")
            prompts, chi = self._tokenized_prompts(prompt, max_sequence_length, complex_human_instruction)
            with clock("tokenize"):
                ids, mask = self.tokenizer(prompts, max_sequence_length, chi)
            with clock("text_encoder"):
                hidden = self._encode_tokens(ids, mask, chi)
            index = select_index(max_sequence_length)
            embeds, mask = hidden[:, index], mask[:, index]
        embeds = np.repeat(embeds, num_images_per_prompt, axis=0) if num_images_per_prompt > 1 else embeds
        # diffusers repeats the mask with .repeat(n, 1): the whole batch n times, not each row n times.
        mask = np.tile(mask, (num_images_per_prompt, 1))
        return embeds, mask

    def cache_instruction(self, complex_human_instruction=D.DEFAULT_COMPLEX_HUMAN_INSTRUCTION) -> None:
        """Run the instruction through the text encoder now, which the first prompt with it would otherwise
        do (a server calls this before it reports ready, so no request pays for it)."""
        if self.text_encoder is not None and complex_human_instruction and self.reuse_instruction_prefix:
            chi = "\n".join(complex_human_instruction)
            self._text_runner.prefix(self.text_encoder, self.tokenizer.instruction_ids(chi))

    def _tokenized_prompts(self, prompt, max_sequence_length, complex_human_instruction) -> tuple[list[str], str | None]:
        """The preprocessed prompts and the instruction text, once the tokenized length fits the engines."""
        prompts = preprocess(prompt)
        chi = "\n".join(complex_human_instruction) if complex_human_instruction else None
        length = self.tokenizer.text_length(max_sequence_length, chi)
        if length > self.model_dims.text_len_max:
            raise invalid("max_sequence_length", max_sequence_length,
                          f"a length whose tokenized text (here {length}) fits the engine's {self.model_dims.text_len_max}",
                          "lower max_sequence_length or rebuild the engines with a longer text profile")
        return prompts, chi

    def _encode_tokens(self, ids: np.ndarray, mask: np.ndarray, chi: str | None) -> np.ndarray:
        """Gemma2 hidden states [B, L, D] of right-padded tokens, through the prompt cache if there is one."""
        cache = self.prompt_cache
        if cache is None:
            return self._run_text_encoder(ids, mask, chi)
        keys = [cache.key(self._encoder_id, ids[r], mask[r]) for r in range(len(ids))]
        rows = [cache.get(k) for k in keys]
        missing = [r for r, row in enumerate(rows) if row is None]
        if missing:
            hidden = self._run_text_encoder(ids[missing], mask[missing], chi)
            for i, r in enumerate(missing):
                rows[r] = hidden[i, :int(mask[r].sum())]  # the real tokens; the rest is never read
                cache.put(keys[r], rows[r])
        full = np.zeros((len(ids), ids.shape[1], self.model_dims.text_hidden), dtype=np.float32)
        for r, row in enumerate(rows):
            full[r, :len(row)] = row
        return full

    def _run_text_encoder(self, ids: np.ndarray, mask: np.ndarray, chi: str | None) -> np.ndarray:
        """Gemma2 hidden states [B, L, D] of right-padded tokens.

        With trim_padding (the default) the encoder runs only up to the longest real row, and the
        padded tail is zeros instead of Gemma's hidden states of <pad>. The images do not change:
        Gemma2 is causal, so no real token sees the padding, and the transformer reads text only
        through cross-attention, where padded keys get a -10000 bias, i.e. softmax weight exactly 0.
        With reuse_instruction_prefix the instruction's positions come from its cached prefix.
        """
        length = ids.shape[1]
        if self.trim_padding:
            used = int(mask.sum(axis=1).max())  # the tokenizer pads on the right
            n = min(max(used, self.limits[S.TEXT_ENCODER]["text_len"].min), length)
        else:
            n = length
        prefix = None
        if chi and self.reuse_instruction_prefix:
            prefix = self._text_runner.prefix(self.text_encoder, self.tokenizer.instruction_ids(chi))
        hidden = self._text_runner.encode(self.text_encoder, ids[:, :n], mask[:, :n], prefix)
        if n == length:
            return hidden
        full = np.zeros((ids.shape[0], length, hidden.shape[2]), dtype=hidden.dtype)
        full[:, :n] = hidden
        return full

    # ---- input checks -----------------------------------------------------------------------
    @pipeline_call(TEXT_TO_IMAGE)
    def check_arguments(self, args: CallArguments) -> None:
        """Raise the InvalidInputError a call with these arguments would raise, without running an engine
        (a server checks each request before it joins a batch). Takes __call__'s arguments."""
        self._check_arguments(args)

    def _check_arguments(self, args: CallArguments) -> None:
        self._check_call(args)
        if args.prompt is not None:
            self._tokenized_prompts(args.prompt, args.max_sequence_length, args.complex_human_instruction)
        n = args.num_images_per_prompt
        noise_source(args.generator, len(preprocess(args.prompt)) * n if args.prompt is not None else n)

    def _check_call(self, args: CallArguments) -> tuple[tuple[int, int], SCMScheduler]:
        """Every check of a call's scalars and size; returns the size to generate and the scheduler."""
        self._check_scalars(args.guidance_scale, args.num_images_per_prompt, args.output_type, args.max_sequence_length,
                            args.clean_caption)
        self._check_extensions(args.attention_kwargs, args.callback_on_step_end, args.callback_on_step_end_tensor_inputs)
        height, width = args.height, args.width
        if args.use_resolution_binning:
            self._check_binnable(height, width)
            self._check_size(*classify_height_width_bin(height, width), binned_from=(height, width))
        else:
            self._check_size(height, width)
        scheduler = SCMScheduler(self.constants.sigma_data)
        scheduler.set_timesteps(args.num_inference_steps, args.timesteps, args.max_timesteps,
                                args.intermediate_timesteps)
        return (height, width), scheduler

    @staticmethod
    def _check_extensions(attention_kwargs, callback, callback_inputs) -> None:
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise invalid("attention_kwargs", attention_kwargs, "a dict or None, as in diffusers", "pass None")
        if attention_kwargs:
            # Accepted so diffusers code runs unchanged, but it cannot change what the engines compute: say so once.
            notice(f"attention_kwargs={attention_kwargs!r} has no effect: the engines' attention is compiled in, so a "
                   "LoRA scale does nothing. Fix: fuse LoRAs into the checkpoint before `sprintrt export`",
                   once="attention_kwargs")
        if callback is not None and not callable(callback):
            raise invalid("callback_on_step_end", callback, "a callable (pipe, step, timestep, callback_kwargs) -> dict",
                          "pass a function, or None")
        names = getattr(callback, "tensor_inputs", callback_inputs) or []
        unknown = [n for n in names if n not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise invalid("callback_on_step_end_tensor_inputs", names, f"names from {list(CALLBACK_TENSOR_INPUTS)}",
                          f"drop {unknown}")

    def _check_scalars(self, guidance_scale, num_images_per_prompt, output_type, max_sequence_length, clean_caption):
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)) \
                or not math.isfinite(guidance_scale):
            raise invalid("guidance_scale", guidance_scale, f"a finite number (default {D.DEFAULT_GUIDANCE_SCALE})",
                          f"pass e.g. {D.DEFAULT_GUIDANCE_SCALE}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) \
                or not 1 <= num_images_per_prompt <= self.model_dims.max_batch:
            raise invalid("num_images_per_prompt", num_images_per_prompt, f"an integer in [1, {self.model_dims.max_batch}]",
                          "ask for fewer images per call")
        if output_type not in OUTPUT_TYPES:
            raise invalid("output_type", output_type, f"one of {OUTPUT_TYPES}", "pass output_type='pil' or 'np'")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) \
                or not 1 <= max_sequence_length <= D.MAX_SEQUENCE_LENGTH_LIMIT:
            raise invalid("max_sequence_length", max_sequence_length, f"an integer in [1, {D.MAX_SEQUENCE_LENGTH_LIMIT}]",
                          f"use the default {D.DEFAULT_MAX_SEQUENCE_LENGTH}")
        if clean_caption:
            raise invalid("clean_caption", clean_caption, "False (the runtime does not bundle bs4/ftfy)",
                          "clean captions before calling, or pass clean_caption=False")

    def _check_binnable(self, height, width) -> None:
        """A binned call generates at a bin and resizes the image back to height x width, so the request itself
        must be a size the model can make: up to its largest latent (4096 px at 32x), never more (the resize
        of a 99999² request would allocate 112 GiB)."""
        if self.constants.sample_size != 32:
            raise InvalidInputError(f"use_resolution_binning needs a transformer with sample_size 32, this model has "
                                    f"{self.constants.sample_size}. Fix: pass use_resolution_binning=False")
        top = self.model_dims.latent_max * self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise invalid(name, v, "a positive integer number of pixels", "pass e.g. 1024")
            if v > top:
                raise invalid(name, v, f"[1, {top}] pixels (the largest image this model generates: latent "
                              f"{self.model_dims.latent_max} x {self.vae_scale_factor})",
                              f"ask for at most {top} px and upscale the image afterwards")

    def latent_limits(self) -> dict[str, S.Bounds]:
        """The latent sizes every loaded engine that takes latents accepts: the intersection of their
        profiles (ONNX Runtime and OpenVINO: the spec's full range; TensorRT: the built profile)."""
        limits = {}
        for comp in (*S.TRANSFORMER_FAMILY, S.VAE_DECODER, S.VAE_ENCODER):
            if comp not in self.limits:
                continue
            for dim in ("latent_height", "latent_width"):
                b = self.limits[comp][dim]
                have = limits.get(dim, b)
                limits[dim] = S.Bounds(max(have.min, b.min), b.opt, min(have.max, b.max))
        return limits

    def _check_size(self, height, width, binned_from: tuple[int, int] | None = None) -> None:
        """Pixel sizes the engines can run: multiples of 32 and of the VAE's factor, inside every profile.
        `binned_from`: the requested size the bin height x width was chosen for (named in the error)."""
        f = self.vae_scale_factor
        step = max(32, f)
        limits = self.latent_limits()
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise invalid(name, v, "a positive integer number of pixels", "pass e.g. 1024")
            if v % 32 or v % f:
                raise invalid(name, v, f"a multiple of {step} when use_resolution_binning=False",
                              f"round it to {step * round(v / step) or step} or turn binning on")
            lim = limits[f"latent_{name}"]
            if not lim.min <= v // f <= lim.max:
                backends = sorted({self.manifest.components[c]["backend"] for c in self.limits
                                   if c != S.TEXT_ENCODER})
                binned = "" if binned_from is None else (f"; resolution binning generates {binned_from[0]}x"
                                                         f"{binned_from[1]} at {height}x{width}")
                raise invalid(name, v, f"[{lim.min * f}, {lim.max * f}] pixels (latent_{name} {lim.min}..{lim.max} in "
                              f"the {'/'.join(backends)} engines' profile{binned})",
                              "pick a size inside the profile or rebuild the engines with a wider one "
                              "(`sprintrt build ... --rebuild`; TensorRT: a wider --static or bin range)")

    def _check_latents(self, latents, shape, name: str = "latents") -> np.ndarray:
        if type(latents).__module__.startswith("torch"):
            latents = latents.detach().cpu().float().numpy()
        arr = np.asarray(latents, dtype=np.float32)
        if arr.shape != tuple(shape):
            what = (f"(batch, channels, height/{self.vae_scale_factor}, width/{self.vae_scale_factor})"
                    if name == "latents" else "(the shape it was given)")
            raise invalid(name, f"array of shape {arr.shape}", f"shape {tuple(shape)} {what}",
                          "pass an array of that shape")
        return arr
