"""Every default and shared constant of sprintrt, in one place (Torch-TensorRT's `_defaults` in spirit).

The CLI, the pipeline, the profiles, calibration, the benchmarks and the tests read these names; none
of them restates a value. Pure Python: importable by the runtime on a box without torch.
"""

from __future__ import annotations

# ---- diffusers' SanaSprintPipeline.__call__ defaults (docs/SANA_SPRINT_SPEC.md §1-§2) ----------------
DEFAULT_STEPS = 2
DEFAULT_GUIDANCE_SCALE = 4.5
DEFAULT_HEIGHT = DEFAULT_WIDTH = 1024
# Prompt tokens kept after select_index; with the complex human instruction the tokenizer pads to
# chi_tokens + this - 2 (see tokenized_length).
DEFAULT_MAX_SEQUENCE_LENGTH = 300
# The longest max_sequence_length the exported graphs and engine profiles admit.
MAX_SEQUENCE_LENGTH_LIMIT = 512
DEFAULT_MAX_TIMESTEPS = 1.57080
# The pipeline's intermediate angle: used only with exactly 2 steps (SCMScheduler.set_timesteps).
DEFAULT_INTERMEDIATE_TIMESTEPS = 1.3
INTERMEDIATE_STEPS = 2
# SanaSprintImg2ImgPipeline: the share of the schedule that runs from the input image.
DEFAULT_STRENGTH = 0.6


def intermediate_timesteps_for(steps: int) -> float | None:
    """The intermediate_timesteps a call with `steps` steps takes: 1.3 for 2 steps, None otherwise
    (diffusers refuses an intermediate angle for any other step count)."""
    return DEFAULT_INTERMEDIATE_TIMESTEPS if steps == INTERMEDIATE_STEPS else None


def tokenized_length(max_sequence_length: int, chi_tokens: int | None) -> int:
    """How long the tokenizer pads a prompt: chi_tokens + max_sequence_length - 2 with the complex human
    instruction (whose count includes <bos>; the "-2" are <bos> and one separator token, per the
    original NVlabs code), else max_sequence_length (docs/SANA_SPRINT_SPEC.md §1.2)."""
    return chi_tokens + max_sequence_length - 2 if chi_tokens else max_sequence_length


# ---- what the CLI, demo and benchmarks generate by default -----------------------------------------
DEFAULT_PROMPT = "a small fluffy white cat asleep on a sunny windowsill"

# ---- int8 / fp8 calibration (engines/calibration.py) -------------------------------------------------
# Prompts of the shipped prompt file recorded for calibration, and the image size they are run at.
DEFAULT_CALIBRATION_COUNT = 16
DEFAULT_CALIBRATION_SIZE = 512
# Each prompt is run at these step counts, so the ranges cover every timestep a 1- or 2-step call feeds.
CALIBRATION_STEPS = (1, 2)

# ---- engine profiles ----------------------------------------------------------------------------------
DEFAULT_MAX_BATCH = 4  # TensorRT profiles: largest batch (ONNX Runtime / OpenVINO take the spec's range)
