"""Quantized engines built from calibration data made the way the model is used: each quantized
component's real inputs, recorded while an fp32 SprintPipeline generates from a prompt file at the
timesteps actually run (t = max for 1 step, plus the intermediate step for 2 steps); the ControlNet's two
components' in ControlNet calls of the same prompts, each with its own seeded scribble.

It runs engines to build engines, so it sits above both engines/ and runtime/ (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np

from sprintrt.defaults import (CALIBRATION_STEPS, DEFAULT_BACKEND, DEFAULT_CALIBRATION_COUNT, DEFAULT_CALIBRATION_SIZE,
                               DEFAULT_COMPLEX_HUMAN_INSTRUCTION, DEFAULT_CONTROLNET_SCALE,
                               VAE_CALIBRATION_LATENT_SIDE, VAE_CALIBRATION_SAMPLES, intermediate_timesteps_for)
from sprintrt.errors import InvalidInputError
from sprintrt.prompts import read_prompts
from sprintrt.runtime.image import control_picture, preprocess_image
from sprintrt.runtime.recording import recording
from sprintrt.specs import (COMPONENTS, CONTROLLED_TRANSFORMER, CONTROLNET, CONTROLNET_TO_IMAGE, TEXT_ENCODER,
                            TEXT_TO_IMAGE, TRANSFORMER, VAE_DECODER, VAE_ENCODER)

CONTROLLED = (CONTROLNET, CONTROLLED_TRANSFORMER)  # recorded in ControlNet calls
CALIBRATED = (*TEXT_TO_IMAGE, VAE_ENCODER, *CONTROLLED)  # the components whose inputs a calibration run records
# The engines of the ControlNet-call stage: a ControlNet call's, but the text encoder (prompts are encoded in the first
# stage) and the decoder (the calls stop at the latent).
CONTROLNET_CALLS = tuple(c for c in CONTROLNET_TO_IMAGE if c not in (TEXT_ENCODER, VAE_DECODER))


def _check_count(count) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidInputError(f"calibration count={count!r} is not allowed: expected an integer >= 1. "
                                f"Fix: e.g. {DEFAULT_CALIBRATION_COUNT}")


def record_calibration(pipe, components, prompts: list[str], height: int = DEFAULT_CALIBRATION_SIZE,
                       width: int = DEFAULT_CALIBRATION_SIZE, steps=CALIBRATION_STEPS, count: int | None = None,
                       seed: int = 0) -> dict[str, list[dict]]:
    """{component: input feeds} recorded from `pipe` (an fp32 SprintPipeline; a SprintControlNetPipeline
    for the ControlNet's components) over the prompts: the text encoder once per prompt, the transformer
    at every step of every schedule, the VAE decoder on centre crops (VAE_CALIBRATION_LATENT_SIDE, see
    sprintrt/defaults.py) of the final latents of the first VAE_CALIBRATION_SAMPLES calls, each crop decoded
    alone; the VAE encoder on what it encodes in use, as many of each: pictures (img2img's input: those
    decoded crops, one per prompt, up to VAE_CALIBRATION_SAMPLES) and scribbles (ControlNet's) drawn at
    their size, prepared as the pipelines prepare them; the
    ControlNet and the controlled transformer at every step of ControlNet calls with the same prompts, seeds
    and schedules, each prompt with its own random scribble (`control_picture(seed=...)`) at the default
    conditioning scale. An input already recorded is not kept twice (`_distinct`)."""
    controlled = [c for c in components if c in CONTROLLED]
    if controlled and not hasattr(pipe, "text_to_image"):
        raise InvalidInputError(f"calibrating {controlled} runs ControlNet calls: expected a "
                                "SprintControlNetPipeline. Fix: load one (SprintControlNetPipeline.from_engines)")

    @contextlib.contextmanager
    def given(needed, controlnet: bool):  # text-to-image stages run on a ControlNet pipeline's plain view
        yield pipe if controlnet or not hasattr(pipe, "text_to_image") else pipe.text_to_image()

    return _record(given, components, prompts, height, width, steps, count, seed)


def _record(stage, components, prompts: list[str], height: int, width: int, steps, count, seed: int) -> dict:
    """record_calibration's work in three stages, each with only its own engines: `stage(engines, controlnet)`
    is a context giving a pipeline with those engines loaded (a SprintControlNetPipeline if `controlnet`). At
    real size the engines of all three are ~15 GB, the text encoder's alone 8 GB."""
    unknown = [c for c in components if c not in CALIBRATED]
    if unknown:
        raise InvalidInputError(f"calibration of {unknown} is not recorded: expected components of "
                                f"{list(CALIBRATED)}. Fix: quantize only those")
    if count is not None:
        _check_count(count)
        prompts = prompts[:count]
    feeds: dict[str, list[dict]] = {}
    # 1. The prompts, encoded once each (later stages start from the embeddings). A quantized text encoder sees
    # every token of its prompts, the instruction's too, as the pipeline's first call per instruction does
    # (later calls reuse the instruction's cached prefix).
    recorded = [c for c in components if c == TEXT_ENCODER]
    with stage((TEXT_ENCODER,), False) as pipe, recording(pipe, recorded) as recorders:
        reuse, pipe.reuse_instruction_prefix = pipe.reuse_instruction_prefix, not recorded
        factor = pipe.vae_scale_factor
        try:
            embeddings = [pipe.encode_prompt(p, complex_human_instruction=list(DEFAULT_COMPLEX_HUMAN_INSTRUCTION))
                          for p in prompts]
        finally:
            pipe.reuse_instruction_prefix = reuse
    feeds.update({c: r.feeds for c, r in recorders.items()})

    def schedules():  # (prompt index, the call's arguments) for every schedule of every prompt
        for i, (embeds, mask) in enumerate(embeddings):
            for n in steps:
                yield i, dict(prompt_embeds=embeds, prompt_attention_mask=mask, num_inference_steps=n,
                              intermediate_timesteps=intermediate_timesteps_for(n), generator=seed + i, height=height,
                              width=width, use_resolution_binning=False)

    # 2. Text-to-image calls: the transformer's inputs, the decoder's latents, the pictures the encoder gets.
    recorded = [c for c in (TRANSFORMER, VAE_DECODER) if c in components]
    pictures: list[np.ndarray] = []  # decoded images, NHWC in [0, 1]: the VAE encoder's img2img inputs
    if _text_to_image_engines(components):
        with stage(_text_to_image_engines(components), False) as pipe, \
                _repeats_run_once(pipe, (TRANSFORMER,)) as runs, recording(pipe, recorded) as recorders:
            for i, call in schedules():
                # a picture per prompt (its schedules give nearly the same one), up to the cap
                picture = VAE_ENCODER in components and len(pictures) < min(i + 1, VAE_CALIBRATION_SAMPLES)
                decode = picture or (VAE_DECODER in recorders
                                     and len(recorders[VAE_DECODER].calls) < VAE_CALIBRATION_SAMPLES)
                runs.last_step_unread(TRANSFORMER, None if decode else call["num_inference_steps"])
                latents = pipe(**call, output_type="latent").images
                if decode:  # only the crop calibration keeps (a quarter of a 512² decode: real fp32 decoder 6.5 s)
                    decoded = pipe.decode_latents(_centre_crop(latents, _crop_side(VAE_DECODER, factor)))
                    if picture:
                        pictures.append(decoded)
        feeds.update({c: r.feeds for c, r in recorders.items()})
    if VAE_DECODER in feeds:  # the encoder's pictures may have decoded more (a picture per prompt, two schedules each)
        feeds[VAE_DECODER] = feeds[VAE_DECODER][:VAE_CALIBRATION_SAMPLES]
    # 3. ControlNet calls, each prompt with its own scribble (encoded once for all its schedules).
    recorded = [c for c in components if c in CONTROLLED]
    if recorded:
        with stage(CONTROLNET_CALLS, True) as pipe, _repeats_run_once(pipe, (VAE_ENCODER, *CONTROLLED)) as runs, \
                recording(pipe, recorded) as recorders:
            for i, call in schedules():
                # the latents are not decoded; the ControlNet's last outputs are the controlled transformer's inputs
                runs.last_step_unread(CONTROLLED_TRANSFORMER, call["num_inference_steps"])
                pipe(**call, control_image=control_picture(height, width, seed=seed + i),
                     controlnet_conditioning_scale=DEFAULT_CONTROLNET_SCALE, output_type="latent")
        feeds.update({c: r.feeds for c, r in recorders.items()})
    if VAE_ENCODER in components:  # its inputs are made, not recorded: no encoder runs for them
        side = _crop_side(VAE_ENCODER, factor)  # the decoded crops' side in pixels (where the latents had it)
        pixels = [preprocess_image("array", p.transpose(0, 3, 1, 2), *p.shape[1:3]) for p in pictures]
        # scribbles drawn at the crop's size: a crop of a larger one may miss every stroke
        pixels += [preprocess_image("pil", [control_picture(side, side, seed=seed + i)], side, side)
                   for i in range(len(pictures))]
        feeds[VAE_ENCODER] = [{"sample": p} for p in pixels]
    return {c: _distinct(feeds[c]) for c in components}


def _distinct(feeds: list[dict]) -> list[dict]:
    """`feeds` without those equal to an earlier one. A prompt's 1-step call feeds the transformer (and the
    ControlNet's two) exactly what its 2-step call's first step does: same noise, same timestep. A repeated input
    changes no min/max range and cost a third of every pass over the set: at real size the transformer's ranges
    (48 inputs, 78 s) and its sensitivity's fp32 pass and verification."""
    seen, kept = set(), []
    for feed in feeds:
        digest = hashlib.sha256()
        for name in sorted(feed):
            value = np.ascontiguousarray(feed[name])
            digest.update(f"{name}{value.dtype}{value.shape}".encode())
            digest.update(value.tobytes())
        if digest.digest() not in seen:
            seen.add(digest.digest())
            kept.append(feed)
    return kept


class _Runs:
    """What `_repeats_run_once` yields: per engine it wraps, whether the next pipeline call's last step is read, and
    the engine's calls so far in that pipeline call."""

    def __init__(self):
        self.unread: dict[str, int] = {}  # component -> the number of its calls in the next pipeline call
        self.calls: dict[str, int] = {}  # component -> its calls so far in that call

    def last_step_unread(self, component: str, steps: int | None) -> None:
        """The next pipeline call runs `component` `steps` times, and nothing reads its last outputs (the call's
        latents are not decoded): that run is recorded but not made, unless `steps` is 1 or None. A 1-step call's
        output is the first step of the same prompt's 2-step call (given back by `_repeats_run_once`), so it runs.
        Measured at real size (0.6B, 16 prompts at 512²): 12 of the transformer's 32 fp32 runs of 1.4 s (2-vCPU Intel
        Xeon with AMX) were such last steps."""
        self.calls[component] = 0
        if steps is None or steps < 2:
            self.unread.pop(component, None)
        else:
            self.unread[component] = steps


@contextlib.contextmanager
def _repeats_run_once(pipe, components):
    """While active, each of `components`' engines of `pipe` runs again only when its input differs from its
    previous call's (the previous outputs are given back, as copies). A prompt's 2-step call starts with its
    1-step call's transformer input (same noise, same timestep), and a ControlNet call encodes the same control
    image at every step: at real size one fp32 transformer run per prompt saved (0.6B at 512², ONNX Runtime fp32:
    1.4 s on a 2-vCPU Intel Xeon with AMX), two per prompt of ControlNet calls. Engines are deterministic, so what
    is recorded is unchanged. Yields a _Runs: a call's last step that nothing reads gives back zeros shaped like
    the step before's outputs, instead of running (`_Runs.last_step_unread`); its inputs are recorded all the same,
    and only that call's unread latents change."""
    engines = {c: pipe.engine(c) for c in components}
    runs = _Runs()

    def once(component, engine):
        last: dict = {}

        def run(**feeds):
            runs.calls[component] = runs.calls.get(component, 0) + 1
            same = (last and last["feeds"].keys() == feeds.keys()
                    and all(np.array_equal(feeds[k], v) for k, v in last["feeds"].items()))
            if not same and last and runs.calls[component] == runs.unread.get(component):
                zeros = {k: np.zeros_like(v) for k, v in last["out"].items()}
                last.clear()  # nothing is given back for these inputs later: they did not run
                return zeros
            if not same:
                last.update(feeds={k: np.array(v, copy=True) for k, v in feeds.items()}, out=engine(**feeds))
            return {k: np.array(v, copy=True) for k, v in last["out"].items()}
        return run

    for c, engine in engines.items():
        pipe.set_engine(c, once(c, engine))
    try:
        yield runs
    finally:
        for c, engine in engines.items():
            pipe.set_engine(c, engine)


def _centre_crop(latent, side: int):
    """The centre side x side latent pixels (all of them where the latent is smaller)."""
    h, w = latent.shape[-2:]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return latent[..., top:top + side, left:left + side].copy()


def cropped_like_calibration(component: str, feed: dict, vae_scale_factor: int) -> dict:
    """`feed` cropped as calibration crops a VAE's samples (VAE_CALIBRATION_LATENT_SIDE latent pixels, that
    many times the scale factor in picture pixels): one whole real-size sample at 512² took more than 24 GB to
    calibrate. Other components' feeds are returned as they are."""
    side = _crop_side(component, vae_scale_factor)
    return feed if side is None else {k: _centre_crop(v, side) for k, v in feed.items()}


def _crop_side(component: str, vae_scale_factor: int) -> int | None:
    """The side of a VAE's calibration crops (the decoder's in latent pixels, the encoder's in picture pixels)."""
    return {VAE_DECODER: VAE_CALIBRATION_LATENT_SIDE,
            VAE_ENCODER: VAE_CALIBRATION_LATENT_SIDE * vae_scale_factor}.get(component)


def transformer_calibration(pipe, prompts: list[str], height: int = DEFAULT_CALIBRATION_SIZE,
                            width: int = DEFAULT_CALIBRATION_SIZE, steps=CALIBRATION_STEPS,
                            count: int | None = None, seed: int = 0) -> list[dict]:
    """The transformer's input feeds recorded from `pipe` over the prompts (see record_calibration)."""
    return record_calibration(pipe, (TRANSFORMER,), prompts, height, width, steps, count, seed)[TRANSFORMER]


# How record_calibration draws samples beyond the prompts, size and schedules (the VAE crops, the encoder's
# picture/scribble mix, the scribble generator runtime.image.control_picture). It is part of every quantized
# engine's key through calibration_description: bump it when any of those changes, so no engine calibrated
# the old way is reused.
CALIBRATION_SAMPLING = 4  # 3: the encoder's pictures decoded from the decoder's latent crops (were crops of pictures);
# 4: repeated inputs kept once (_distinct; for fp8's distribution calibration a repeat weighed twice)


def calibration_description(prompts_file, prompts: list[str], size: int, precision: str) -> str:
    """What the calibration set is (part of the quantized engines' keys)."""
    method = "minmax" if precision == "int8" else "distribution"
    steps = ",".join(map(str, CALIBRATION_STEPS))
    return (f"{prompts_file or 'shipped prompts'}; {len(prompts)} prompts; {size}px; steps {steps}; {method}; "
            f"sampling v{CALIBRATION_SAMPLING}, VAE crops {VAE_CALIBRATION_LATENT_SIDE} latent px x "
            f"{VAE_CALIBRATION_SAMPLES}")


def _text_to_image_engines(components) -> tuple[str, ...]:
    """The engines of the text-to-image stage (none: no such stage): the transformer, and the decoder where a
    call is decoded (for the decoder's latents, or the pictures the VAE encoder's inputs are made of)."""
    decode = VAE_DECODER in components or VAE_ENCODER in components
    return (TRANSFORMER, VAE_DECODER) if decode else (TRANSFORMER,) if TRANSFORMER in components else ()


def calibration_engines(components) -> tuple[str, ...]:
    """Every engine record_calibration runs to record `components`' inputs (no more: at real size each is GBs)."""
    needed = {TEXT_ENCODER, *_text_to_image_engines(components),
              *(CONTROLNET_CALLS if set(components) & set(CONTROLLED) else ())}
    return tuple(c for c in COMPONENTS if c in needed)


def lazy_calibration(onnx_dir: str | Path, engines: Path, components, prompts: list[str], size: int, profile=None,
                     say=lambda msg: None, reuse: bool = False):
    """feeds_of(component) -> a callable recording every quantized component's feeds once, on first use,
    with fp32 ONNX Runtime engines: those in `engines` if `reuse`, else built there and removed afterwards.
    build_engines calls it only if a quantized engine must be built (not when one is reused)."""
    import shutil

    from sprintrt.engines.build import build_engines
    from sprintrt.runtime.controlnet import SprintControlNetPipeline
    from sprintrt.runtime.pipeline import SprintPipeline

    recorded: dict = {}

    @contextlib.contextmanager
    def stage(needed, controlnet: bool):  # one stage's engines, loaded for it alone (see _record)
        pipe = (SprintControlNetPipeline if controlnet else SprintPipeline).from_engines(engines, components=needed)
        try:
            yield pipe
        finally:
            for c in needed:
                pipe.engine(c).release()
            del pipe
            _return_freed_memory()

    def feeds_of(component: str):
        def feeds() -> list[dict]:
            if not recorded:
                try:
                    if not reuse:
                        say("fp32 engines for calibration")
                        build_engines(onnx_dir, engines, backend=DEFAULT_BACKEND, precision="fp32", profile=profile,
                                      components=calibration_engines(components))
                    say(f"calibrating {', '.join(components)} on {len(prompts)} prompts at {size}x{size}")
                    recorded.update(_record(stage, components, prompts, size, size, CALIBRATION_STEPS, None, 0))
                finally:
                    if not reuse:
                        shutil.rmtree(engines, ignore_errors=True)
                    _return_freed_memory()
            say(f"quantizing {component}")
            return recorded[component]
        return feeds

    return feeds_of


def _return_freed_memory() -> None:
    """Give the heap pages the calibration engines freed back to the OS before quantizing: glibc keeps
    them otherwise (measured with the real 0.6B engines: 5.4 GB still resident after they were released)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def build_quantized_engines(onnx_dir: str | Path, engine_dir: str | Path, prompts_file: str | Path | None = None,
                            count: int = DEFAULT_CALIBRATION_COUNT, size: int = DEFAULT_CALIBRATION_SIZE,
                            profile=None, progress=None,
                            backend: str = DEFAULT_BACKEND, precision="int8", target: str | None = None) -> Path:
    """Engines with int8 (or fp8) components for `backend`: `precision` is "int8"/"fp8" (every component
    with a recipe that the backend quantizes) or per component, e.g. "transformer=int8,vae_decoder=int8".
    Unless engine_dir already holds those engines (same keys: the calibration description is part of
    them), fp32 ONNX Runtime engines are built in a scratch directory beside engine_dir, the quantized
    components' inputs are recorded while they generate from the calibration prompts, and the Q/DQ
    graphs are built from them. Returns engine_dir."""
    from sprintrt.engines.build import build_engines
    from sprintrt.engines.precision import QUANTIZED, PrecisionRequest, quantized_precisions
    from sprintrt.engines.quantize import quantizable_nodes
    from sprintrt.export_info import read_export_info

    say = progress or (lambda msg: None)
    _check_count(count)
    precisions = quantized_precisions(precision, backend)  # fp8 on a CPU backend and the like fail before any work
    exported = read_export_info(onnx_dir)["components"]  # "int8" alone: those of them this export holds
    quantized = [c for c, p in precisions.items() if p in QUANTIZED and c in exported]
    named = [c for c in PrecisionRequest.parse(precision).components if c not in exported]
    if not quantized or named:
        asked = named or [c for c, p in precisions.items() if p in QUANTIZED]
        raise InvalidInputError(f"precision={precision!r} names {asked}, which {onnx_dir} has no export of "
                                f"(it holds {list(exported)}). Fix: quantize components of this export, or export "
                                "the model with them (a ControlNet: `sprintrt export --controlnet ...`)")
    for comp in quantized:  # fail before any work on an export without module paths
        quantizable_nodes(Path(onnx_dir) / f"{comp}.onnx", comp)
    prompts = read_prompts(prompts_file)[:count]
    engine_dir = Path(engine_dir)
    feeds_of = lazy_calibration(onnx_dir, engine_dir.with_name(f".{engine_dir.name}.calibration"), quantized,
                                prompts, size, profile, say)
    return build_engines(onnx_dir, engine_dir, backend=backend, precision=precisions, profile=profile, target=target,
                         progress=lambda component, what: say(f"{component}: {what}"),
                         calibration={c: (calibration_description(prompts_file, prompts, size, precisions[c].value),
                                       feeds_of(c)) for c in quantized})
