"""Every default and shared constant of sprintrt, in one place (Torch-TensorRT's `_defaults` in spirit).

The pipeline's call signature (runtime/call.py), the option dataclasses (ServeOptions, LoadConfig,
BenchConfig, ProfileOptions), calibration, the tuner and the tests read these names; the CLI takes its
defaults from those dataclasses and signatures (tests/test_cli.py checks that it writes none). Pure
Python: importable by the runtime on a box without torch.
"""

from __future__ import annotations

from pathlib import Path

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
DEFAULT_CONTROLNET_SCALE = 1.0  # SanaControlNetPipeline's controlnet_conditioning_scale
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
DEFAULT_SEED = 0  # generate, make-checkpoint, bench: the same seed gives the same weights and images

# ---- checkpoints and export ----------------------------------------------------------------------
ARCHS = ("tiny", "0.6B", "1.6B")  # `make-checkpoint --arch`: tiny (tests, demo) or the released architectures
DEFAULT_ARCH = "tiny"
# Graphs `sprintrt export` writes per component: the fp32 graph and the bf16 variant (TensorRT's and OpenVINO
# bf16's source); fp16 on request.
EXPORT_DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_EXPORT_DTYPES = ("fp32", "bf16")

# ---- `sprintrt build` --------------------------------------------------------------------------------
# Runs on every CPU; `auto` picks or tunes per machine. Its fp32 engines are also the reference every reduced
# precision is compared with and the engines calibration inputs are recorded with.
DEFAULT_BACKEND = "onnxruntime"

# ---- int8 / fp8 calibration (tuning/calibration.py) -------------------------------------------------
# Prompts of the shipped prompt file recorded for calibration, and the image size they are run at.
DEFAULT_CALIBRATION_COUNT = 16
DEFAULT_CALIBRATION_SIZE = 512
# Each prompt is run at these step counts, so the ranges cover every timestep a 1- or 2-step call feeds.
CALIBRATION_STEPS = (1, 2)
# The VAE decoder is calibrated on the final latents of the first calls only: each sample is a decode of its
# crop (below) plus ORT's calibration pass over it. The VAE encoder on as many pictures (those decoded crops, one
# per prompt) and as many scribbles.
VAE_CALIBRATION_SAMPLES = 8
# ... and on their centre crop of at most this many latent pixels a side (256² pixels with the f32 DC-AE):
# ORT's calibration holds every intermediate output of a sample at once, and one real-decoder sample at
# 512² took more than 24 GB (killed, measured). A convolution's ranges are those of its neighbourhoods.
VAE_CALIBRATION_LATENT_SIDE = 8
# int8 layers chosen by measured sensitivity (engines/sensitivity.py): the calibration samples each layer group
# is measured on (the chosen set is verified on all of them: 8 for the decoder), and the margin over
# IMAGE_MIN_PSNR_DB asked on them (the tuner's gate sees other inputs).
INT8_SENSITIVITY_SAMPLES = 1
INT8_SENSITIVITY_MARGIN_DB = 3.0

# ---- `sprintrt build --backend auto`: per-component tuning on CPUs (tuning/tune.py) -------------------
# The quality gate: a candidate's outputs must have at least this cosine similarity with the fp32 ONNX
# Runtime reference's on the same inputs, for every output, or it is never chosen. Measured on the tiny
# checkpoint: int8 transformer 0.9999, OpenVINO fp32 1.0; a broken engine is far below.
TUNE_MIN_COSINE = 0.999
# ... and a network whose output is the picture (the VAE decoder) must also keep this PSNR against the
# reference's picture (issue #29's image gate: 0.999 cosine alone let through decoders 5 dB short of it).
IMAGE_MIN_PSNR_DB = 40.0
# Each candidate: one warm-up call, then at least TUNE_MIN_RUNS timed calls (median), more for fast ones
# until TUNE_MIN_SECONDS in total or TUNE_MAX_RUNS. One timed call was not enough: on a shared 2-vCPU VM
# the same real-size VAE engine measured 13.4 s in one process and 16.3 s in another.
TUNE_MIN_RUNS = 3
TUNE_MAX_RUNS = 10
TUNE_MIN_SECONDS = 2.0
# A tuner that finishes in minutes (issue #29: real size took 47 min on 2 cores): every candidate is first
# timed on the inputs of a call TUNE_SCREEN_DIVISOR times smaller a side (a quarter of the pixels), and only
# those within TUNE_LEADER_RATIO of the best passing one there are timed and gated at the tuning size; a
# candidate whose first timed call is already TUNE_DROP_RATIO times the best's median is not timed further.
TUNE_SCREEN_DIVISOR = 2
TUNE_LEADER_RATIO = 1.25
TUNE_DROP_RATIO = 2.0
# An int8 candidate is first screened as an uncalibrated uniform-int8 probe (tuning/tune.py `_Trials.probe`), by
# the two ratios above; where its recipe is not chosen by measurement, a probe whose cosine to the reference is
# below TUNE_PROBE_MIN_COSINE is dropped before calibration. The probe's ranges fit its own input, so it scores
# above its calibrated engine: measured at real size (0.6B, random weights, AMX Xeon), OpenVINO int8 text
# encoder probe 0.99845 vs calibrated 0.99670, transformer probe >= 0.999 vs calibrated 0.99895. A margin under
# the gate (0.998 was tried) would have let the text encoder through to a calibration it then fails.
# And a backend's fp32 candidate is not built where its 16-bit one passed the gate (`_Trials.dominated`), and the
# fp32 reference is timed at the tuning size only where the screen leaves it a leader (`_Trials.settle`).
# Bump TUNE_SCREEN_RULES when the screening rules change (part of the tuning key): 2, the fp32 rule; 3, the
# reference's.
TUNE_PROBE_MIN_COSINE = TUNE_MIN_COSINE
TUNE_SCREEN_RULES = 3
# The tuner refuses to start where its scratch directory would not fit beside the engine directory: the fp32
# reference engines of every exported component plus, per tuned component, the best candidate so far, the one being
# built and the int8 graphs (tuning/tune.py). Peak measured at the real 0.6B size (11.8 GB of fp32 weights, four
# components, 2-vCPU Intel Xeon with AMX, sampled every 10 s): 41.5 GB (3.5x) while OpenVINO kept a whole
# compiled blob beside each IR.
TUNE_DISK_FACTOR = 3.5
# int8 candidates are skipped where calibrating would not fit in memory. Calibration holds one copy of
# the weights at a time (engines/quantize.py): measured at the real 0.6B size, calibrating and quantizing
# Gemma2 (8.1 GB of fp32 weights) and the transformer peaked at 11.0 GB for the whole build, the fp32
# engines that record the inputs included (1.4x the largest weights). 2x leaves a margin: the real text
# encoder's int8 candidate fits a 24 GB machine.
CALIBRATION_MEMORY_FACTOR = 2

# ---- engine profiles ----------------------------------------------------------------------------------
DEFAULT_MAX_BATCH = 4  # TensorRT profiles: largest batch (ONNX Runtime / OpenVINO take the spec's range)

# ---- running engines ---------------------------------------------------------------------------------
# The most intra-op threads per usable CPU an engine may be given: past that threads only contend
# (--threads 1000 on 2 vCPUs ran 250x slower).
MAX_THREADS_PER_CPU = 2

# ---- `sprintrt bench`, `drift` and `demo` --------------------------------------------------------------
OUT_DIR = Path("out")  # where the CLI writes results, work directories and the demo, unless told otherwise
BENCH_SIZE = 512  # pixels a side (binning off): the paper's 512 px model and a CPU-friendly size
BENCH_STEPS = 1
BENCH_WARMUP = 1
BENCH_RUNS = 3
DRIFT_PROMPTS = 4  # prompts of the prompt file, each at every seed
DRIFT_SEEDS = (0, 1)
DRIFT_SIZE = 512
DRIFT_STEPS = 1

# ---- `sprintrt serve` and `loadtest` -----------------------------------------------------------------
SERVE_HOST = "127.0.0.1"  # loopback: a server is reachable from elsewhere only when asked for
SERVE_PORT = 8000
UI_PORT = 7860  # `sprintrt ui`: Gradio's usual port
SERVE_MAX_WAIT_MS = 10.0  # how long the batcher waits to fill a batch
SERVE_MAX_QUEUED = 16  # requests admitted per replica (running + waiting); more get 503
SERVE_TIMEOUT_S = 120.0  # per request, from arrival to answer
# Per-request cost limits (413/422 before any work). Pixels are n x width x height: four 1024² images or one
# 2048². A 4096² x 2 request took a 0.6B CPU replica from 4.2 to 9.0 GB and answered 92 MB of JSON.
SERVE_MAX_PIXELS_PER_REQUEST = 4 * 1024 * 1024
SERVE_MAX_STEPS = 8  # SANA-Sprint is distilled for 1-4 steps
SERVE_MAX_PROMPT_BYTES = 8192  # UTF-8 bytes; the text encoder reads at most max_sequence_length (300) tokens
SERVE_DRAIN_TIMEOUT_S = 30.0  # on SIGINT/SIGTERM: how long in-flight requests may still run
LOADTEST_CONCURRENCY = 4
LOADTEST_REQUESTS = 32
LOADTEST_SIZE = "512x512"
LOADTEST_DURATION_S = 600.0  # hard stop for the whole run
LOADTEST_TIMEOUT_S = 300.0  # per request

# ---- the complex human instruction (docs/SANA_SPRINT_SPEC.md §1.2) ---------------------------------
# diffusers' default (SanaSprintPipeline.__call__), kept here so the runtime has it without diffusers.
# Joined with "\n" and prepended to every prompt.
DEFAULT_COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
)
