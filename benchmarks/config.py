"""What a benchmark run measures: the systems (diffusers baselines, sprintrt engine choices), shapes,
repetitions and options, checked before any work is done."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sprintrt import defaults as D
from sprintrt.engines.precision import EngineChoice, Precision
from sprintrt.engines.registry import ALIASES, AUTO, BUILD_BACKENDS
from sprintrt.errors import InvalidInputError

# optimum-intel: OVSanaSprintPipeline, run by benchmarks/optimum_intel.py in its own environment (--optimum-python)
OPTIMUM = "optimum-intel"
BASELINES = ("torch-fp32", "torch-bf16", "torch-compile-bf16", OPTIMUM)
# The system every image is compared with and every speed-up is a ratio to.
REFERENCE_BASELINE = "torch-fp32"
TORCH_DEVICES = ("cpu", "cuda")


def parse_candidate(text: str) -> EngineChoice:
    """'ort:fp32' / 'ov:bf16' / 'trt' (fp32) / 'auto' (the tuned engines) → EngineChoice."""
    backend = text.partition(":")[0].strip()
    if backend != AUTO and ALIASES.get(backend, backend) not in BUILD_BACKENDS:
        raise InvalidInputError(f"candidate {text!r} names backend {backend!r}: expected one of {list(BUILD_BACKENDS)} "
                                f"(or {', '.join(ALIASES)}), or auto. Fix: e.g. --candidates ort:fp32,ov:bf16,trt:bf16")
    return EngineChoice.parse(text, default=Precision.FP32)


def system_name(system) -> str:
    """How a system is named in the results: a baseline by its name, an engine choice as 'sprintrt BACKEND PRECISION'."""
    if isinstance(system, str):
        return system
    return f"sprintrt {system.backend} {'tuned' if system.precision is None else system.precision.value}"


@dataclass
class BenchConfig:
    model: str | None = None  # checkpoint dir or hub id; None with arch → a seeded random checkpoint
    arch: str | None = D.DEFAULT_ARCH
    seed: int = D.DEFAULT_SEED
    resolutions: list = field(default_factory=lambda: [(D.BENCH_SIZE, D.BENCH_SIZE)])  # (height, width)
    batches: list = field(default_factory=lambda: [1])
    steps: list = field(default_factory=lambda: [D.BENCH_STEPS])
    candidates: list = field(default_factory=lambda: [EngineChoice(D.DEFAULT_BACKEND, Precision.FP32)])
    baselines: list = field(default_factory=lambda: [REFERENCE_BASELINE, "torch-bf16"])
    warmup: int = D.BENCH_WARMUP
    runs: int = D.BENCH_RUNS
    workdir: Path = Path("out/bench")
    prompt: str = D.DEFAULT_PROMPT
    complex_human_instruction: bool = True
    threads: int | None = None
    calibration_count: int = D.DEFAULT_CALIBRATION_COUNT  # int8 candidates: calibration prompts (shipped file)
    vae: str | None = None  # a drop-in AutoencoderDC for every system (export --vae), e.g. DC-AE-Lite
    prompt_cache: bool = False  # also time sprintrt systems on a repeated prompt with the embedding cache
    strength: float | None = None  # image to image from input_picture() at this strength; None: text to image
    # ControlNet: every system follows control_picture() through the checkpoint's ControlNet (the diffusers
    # baselines: benchmarks/controlnet_reference.py; sprintrt: SprintControlNetPipeline)
    controlnet: bool = False
    optimum_python: str | None = None  # the python of an environment with optimum-intel (the optimum-intel baseline)
    # Where the diffusers baselines run: "cuda" times them on an NVIDIA GPU (the PyTorch row GPU engines are
    # compared with; needs no TensorRT), synchronising the device around every stage.
    torch_device: str = "cpu"

    def systems(self) -> list[tuple[object, str]]:
        """(system, "baseline" | "candidate"), in the order they are run and reported."""
        return [(b, "baseline") for b in self.baselines] + [(c, "candidate") for c in self.candidates]

    def check(self) -> None:
        """Refuse nonsense before any work is done."""
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise InvalidInputError(f"runs={self.runs!r} is not allowed: expected an integer >= 1. Fix: --runs 3")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidInputError(f"warmup={self.warmup!r} is not allowed: expected an integer >= 0. Fix: --warmup 1")
        for b in self.baselines:
            if b not in BASELINES:
                raise InvalidInputError(f"baseline {b!r} is not known: expected some of {list(BASELINES)}. "
                                        "Fix: e.g. --baselines torch-fp32,torch-bf16")
        if OPTIMUM in self.baselines and not (self.optimum_python and Path(self.optimum_python).is_file()):
            raise InvalidInputError(f"baseline {OPTIMUM!r} needs --optimum-python, the python of an environment with "
                                    f"optimum-intel (got {self.optimum_python!r}). Fix: see benchmarks/optimum_intel.py")
        if self.controlnet and self.strength is not None:
            raise InvalidInputError("controlnet=True and strength: there is no ControlNet image to image. Fix: drop one "
                                    "of --controlnet and --strength")
        if OPTIMUM in self.baselines and (self.strength is not None or self.vae or self.controlnet):
            raise InvalidInputError(f"baseline {OPTIMUM!r} runs text to image with the checkpoint's own VAE. Fix: "
                                    "leave out --strength/--vae/--controlnet, or the optimum-intel baseline")
        if REFERENCE_BASELINE not in self.baselines:
            raise InvalidInputError(f"baselines={self.baselines} lack {REFERENCE_BASELINE!r}, the reference every "
                                    f"image is compared with. Fix: add {REFERENCE_BASELINE}")
        for h, w in self.resolutions:
            if h % 32 or w % 32 or h < 32 or w < 32:
                raise InvalidInputError(f"resolution {h}x{w} is not allowed: expected multiples of 32. Fix: e.g. 512 "
                                        "or 768x1280")
        for b in self.batches:
            if not isinstance(b, int) or b < 1:
                raise InvalidInputError(f"batch {b!r} is not allowed: expected an integer >= 1. Fix: --batches 1,2")
        for s in self.steps:
            if not isinstance(s, int) or s < 1:
                raise InvalidInputError(f"steps {s!r} is not allowed: expected an integer >= 1. Fix: --steps 1,2")
        if self.torch_device not in TORCH_DEVICES:
            raise InvalidInputError(f"torch_device={self.torch_device!r} is not allowed: expected one of "
                                    f"{list(TORCH_DEVICES)}. Fix: --torch-device cuda on an NVIDIA machine, else cpu")
        if self.torch_device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise InvalidInputError("torch_device='cuda': this PyTorch sees no CUDA GPU (a CPU-only wheel, or no "
                                        "NVIDIA driver). Fix: install a CUDA build of torch on an NVIDIA machine, or "
                                        "--torch-device cpu")
            if OPTIMUM in self.baselines:
                raise InvalidInputError(f"baseline {OPTIMUM!r} runs on the CPU, not with --torch-device cuda. Fix: "
                                        "benchmark it in a CPU run")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise InvalidInputError(f"strength={self.strength} is not allowed: expected (0, 1] for image to image. "
                                    f"Fix: --strength {D.DEFAULT_STRENGTH}, or leave it out for text to image")


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise InvalidInputError(f"resolution {text!r} is not HEIGHT or HEIGHTxWIDTH. Fix: e.g. 512 or 768x1280") from None
    if len(parts) not in (1, 2):
        raise InvalidInputError(f"resolution {text!r} is not HEIGHT or HEIGHTxWIDTH. Fix: e.g. 512 or 768x1280")
    return (parts[0], parts[-1])


def is_auto(system) -> bool:
    """Whether a system is the tuner's engines (`--candidates auto`)."""
    return isinstance(system, EngineChoice) and system.backend == AUTO
