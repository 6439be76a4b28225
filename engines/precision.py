"""Precision of an engine component: the enum, safe per-component defaults, and user overrides.

What each backend may build per component (ALLOWED) follows what SANA-Sprint is known to tolerate
(docs/SANA_SPRINT_SPEC.md §9): Gemma2 never in fp16 (its (1+w) RMSNorm and GeGLU overflow it, and the
docs say it "must stay in bf16"); the transformer in bf16 or fp16 (its linear-attention matmuls,
normaliser division and epsilon pinned to fp32); the DC-AE decoder in bf16, fp16 or fp32. ONNX
Runtime's CPU backend builds fp32, fp16 from the typed variants (not Gemma2) and int8 (Q/DQ) for the
text encoder, transformer and VAE decoder; OpenVINO fp32, bf16, the same int8 graphs, and int8w (int8
weights, NNCF's weight compression, no calibration) for the text encoder and transformer. Each backend
module's `default_precisions()` picks the defaults for the machine and library version at hand.
"""

from __future__ import annotations

from enum import Enum

from sprintrt.errors import InvalidInputError
from sprintrt.export.specs import COMPONENTS, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER


class Precision(str, Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"
    # int8 weights only (per-channel), compute in the backend's float precision: NNCF's weight compression,
    # as optimum-intel applies to large OpenVINO models by default. Needs no calibration data.
    INT8W = "int8w"

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        try:
            return cls(str(value.value if isinstance(value, Precision) else value).strip().lower())
        except ValueError:
            raise InvalidInputError(
                f"precision={value!r} is not known: expected one of {[p.value for p in cls]}. "
                "Fix: pass e.g. --precision fp32") from None


P = Precision

# What each backend can build, per component. INT8/FP8 need Q/DQ ONNX (the quantization step,
# engines/quantize.py: static Q/DQ calibrated on recorded inputs, for the components with a recipe).
ALLOWED = {
    # fp16: the export's typed fp16 variants (fp32 islands kept)
    "onnxruntime": {TEXT_ENCODER: (P.FP32, P.INT8), TRANSFORMER: (P.FP32, P.FP16, P.INT8),
                    VAE_DECODER: (P.FP32, P.FP16, P.INT8), VAE_ENCODER: (P.FP32, P.FP16)},
    # bf16: a run-time hint (from the bf16 variant where exported); int8: OpenVINO runs the same Q/DQ graph
    # with its int8 kernels; int8w: weight compression of the matmul layers (the decoder is convolutions)
    "openvino": {TEXT_ENCODER: (P.FP32, P.BF16, P.INT8, P.INT8W), TRANSFORMER: (P.FP32, P.BF16, P.INT8, P.INT8W),
                 VAE_DECODER: (P.FP32, P.BF16, P.INT8), VAE_ENCODER: (P.FP32, P.BF16)},
    "tensorrt": {
        # int8 / fp8: explicit Q/DQ quantization, strongly typed (fp8 needs compute capability >= 8.9)
        TEXT_ENCODER: (P.FP32, P.TF32, P.BF16, P.INT8),
        TRANSFORMER: (P.FP32, P.TF32, P.BF16, P.FP16, P.INT8, P.FP8),
        VAE_DECODER: (P.FP32, P.TF32, P.BF16, P.FP16, P.INT8),
        VAE_ENCODER: (P.FP32, P.TF32, P.BF16, P.FP16),
    },
}
WHY_NOT = {(TEXT_ENCODER, P.FP16): "Gemma2 overflows fp16 (its docs: the text encoder must stay in bf16)",
           (TRANSFORMER, P.FP8): "fp8 runs on TensorRT only (Ada/Hopper GPUs); the CPU backends have no fp8 kernels",
           (VAE_ENCODER, P.INT8): "the VAE encoder has no int8 recipe (img2img runs it once per image)"}
QUANTIZED = (P.INT8, P.FP8)  # built from a calibrated Q/DQ graph


def resolve_precisions(value, backend: str, components=COMPONENTS, defaults=None) -> dict[str, Precision]:
    """Per-component precisions from None (defaults), one precision for all, a dict, or a string like
    "transformer=fp16,text_encoder=bf16" (unnamed components keep their defaults).

    `defaults` ({component: Precision}) defaults to the backend module's `default_precisions()` for a
    machine not known yet; `build_engines` passes the ones for this machine and library version."""
    from sprintrt.engines.backend import backend_module, canonical

    backend = canonical(backend)
    chosen = dict(defaults or backend_module(backend).default_precisions())
    if isinstance(value, dict):
        chosen.update({k: Precision.parse(v) for k, v in value.items()})
    elif value is not None and "=" in str(value):
        for part in str(value).split(","):
            name, _, prec = part.partition("=")
            name = name.strip()
            if name not in COMPONENTS:
                raise InvalidInputError(f"--precision names component {name!r}: expected one of {list(COMPONENTS)}. "
                                        "Fix: e.g. --precision transformer=fp16,vae_decoder=fp32")
            chosen[name] = Precision.parse(prec)
    elif value is not None:
        one = Precision.parse(value)
        chosen = {c: one for c in COMPONENTS}
    for comp in components:
        p = chosen[comp]
        if p not in ALLOWED[backend][comp]:
            why = WHY_NOT.get((comp, p), f"backend {backend!r} builds {[a.value for a in ALLOWED[backend][comp]]} for it")
            raise InvalidInputError(f"precision={p.value!r} is not available for {comp} on backend {backend!r}: {why}. "
                                    f"Fix: choose one of {[a.value for a in ALLOWED[backend][comp]]}")
    return {c: chosen[c] for c in components}


def quantized_precisions(value, backend: str) -> dict[str, Precision]:
    """Precisions for a quantized build: "int8" / "fp8" alone means every component with a Q/DQ recipe
    that `backend` builds in it (the others keep the backend's defaults); a per-component string or
    dict is taken as given. At least one component must be quantized."""
    from sprintrt.engines.backend import canonical
    from sprintrt.engines.quantize import QUANTIZABLE

    text = value.value if isinstance(value, Precision) else value
    if isinstance(text, str) and "=" not in text:
        one = Precision.parse(text)
        backend_name = canonical(backend)
        value = {c: one for c in QUANTIZABLE if one in ALLOWED[backend_name][c]}
        if not value:
            raise InvalidInputError(f"precision={text!r}: no component is quantized to {one.value} on backend "
                                    f"{backend_name!r}. Fix: e.g. --precision transformer=int8 (fp8 needs --backend "
                                    "tensorrt)")
    chosen = resolve_precisions(value, backend)
    if not any(p in QUANTIZED for p in chosen.values()):
        raise InvalidInputError(f"precision={value!r} quantizes no component: expected int8 or fp8 for at least one "
                                "of them. Fix: e.g. --precision transformer=int8")
    return chosen
