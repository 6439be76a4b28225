"""Quantized engines built from calibration data made the way the model is used: the transformer's
real inputs, recorded while an fp32 SprintPipeline generates from a prompt file at the timesteps
actually run (t = max for 1 step, plus the intermediate step for 2 steps).

This builds engines, so it lives in engines/ and uses the runtime (never the other way round).
"""

from __future__ import annotations

from pathlib import Path

from sprintrt.defaults import (CALIBRATION_STEPS, DEFAULT_CALIBRATION_COUNT, DEFAULT_CALIBRATION_SIZE,
                               intermediate_timesteps_for)
from sprintrt.errors import InvalidInputError
from sprintrt.export.specs import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from sprintrt.prompts import read_prompts


class _Recorder:
    """Wraps an engine; keeps a copy of every call's inputs."""

    def __init__(self, engine):
        self.engine, self.feeds = engine, []

    def __call__(self, **feeds):
        self.feeds.append({k: v.copy() for k, v in feeds.items()})
        return self.engine(**feeds)


def _check_count(count) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidInputError(f"calibration count={count!r} is not allowed: expected an integer >= 1. "
                                f"Fix: e.g. {DEFAULT_CALIBRATION_COUNT}")


def transformer_calibration(pipe, prompts: list[str], height: int = DEFAULT_CALIBRATION_SIZE,
                            width: int = DEFAULT_CALIBRATION_SIZE, steps=CALIBRATION_STEPS,
                            count: int | None = None, seed: int = 0) -> list[dict]:
    """Transformer input feeds recorded from `pipe` (an fp32 SprintPipeline) over the prompts."""
    if count is not None:
        _check_count(count)
        prompts = prompts[:count]
    recorder = _Recorder(pipe.engine("transformer"))
    pipe.set_engine("transformer", recorder)
    try:
        for i, prompt in enumerate(prompts):
            # Encode once per prompt (the text encoder is the slow part at real size), run every schedule.
            embeds, mask = pipe.encode_prompt(prompt, complex_human_instruction=list(DEFAULT_COMPLEX_HUMAN_INSTRUCTION))
            for n in steps:
                pipe(prompt_embeds=embeds, prompt_attention_mask=mask, num_inference_steps=n,
                     intermediate_timesteps=intermediate_timesteps_for(n), height=height, width=width,
                     use_resolution_binning=False, generator=seed + i, output_type="latent")
    finally:
        pipe.set_engine("transformer", recorder.engine)
    return recorder.feeds


def build_quantized_engines(onnx_dir: str | Path, engine_dir: str | Path, prompts_file: str | Path | None = None,
                            count: int = DEFAULT_CALIBRATION_COUNT, size: int = DEFAULT_CALIBRATION_SIZE,
                            profile=None, progress=None,
                            backend: str = "onnxruntime", precision: str = "int8") -> Path:
    """Engines with an int8 (or fp8) transformer for `backend`. Unless engine_dir already holds that
    engine (same key: the calibration description is part of it), fp32 ONNX Runtime engines are built
    in a scratch directory beside engine_dir, the transformer's inputs are recorded while they
    generate from the calibration prompts, and the Q/DQ transformer is built from them. Returns engine_dir."""
    import shutil

    from sprintrt.engines.build import build_engines
    from sprintrt.engines.precision import resolve_precisions
    from sprintrt.engines.quantize import quantizable_nodes
    from sprintrt.runtime.pipeline import SprintPipeline

    say = progress or (lambda msg: None)
    _check_count(count)
    wanted = f"transformer={precision}"
    resolve_precisions(wanted, backend)  # fp8 off TensorRT and the like fail before any work
    quantizable_nodes(Path(onnx_dir) / "transformer.onnx")  # fail before any work on an export without module paths
    prompts = read_prompts(prompts_file)[:count]
    engine_dir = Path(engine_dir)

    def record() -> list[dict]:  # called by build_engines only if the quantized engine must be (re)built
        scratch = engine_dir.with_name(f".{engine_dir.name}.calibration")
        try:
            say("fp32 engines for calibration")
            build_engines(onnx_dir, scratch, backend="onnxruntime", precision="fp32", profile=profile)
            say(f"calibrating on {len(prompts)} prompts at {size}x{size}")
            feeds = transformer_calibration(SprintPipeline.from_engines(scratch), prompts, size, size)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        say(f"quantizing the transformer to {precision}")
        return feeds

    method = "minmax" if precision == "int8" else "distribution"
    steps = ",".join(map(str, CALIBRATION_STEPS))
    description = f"{prompts_file or 'shipped prompts'}; {len(prompts)} prompts; {size}px; steps {steps}; {method}"
    return build_engines(onnx_dir, engine_dir, backend=backend, precision=wanted, profile=profile,
                         calibration={"transformer": (description, record)})
