"""Precision of an engine component: the enum, what --precision asks for, and the per-component resolution.

What each backend may build per component is declared by the backend module (`ALLOWED`) and follows
what SANA-Sprint is known to tolerate (docs/SANA_SPRINT_SPEC.md §9): Gemma2 never in fp16 (its (1+w)
RMSNorm and GeGLU overflow it, and the docs say it "must stay in bf16"); the transformer in bf16 or
fp16 (its linear-attention matmuls, normaliser division and epsilon pinned to fp32); the DC-AE decoder
in bf16, fp16 or fp32. Each backend module's `default_precisions()` picks the defaults for the machine
and library version at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from sprintrt.errors import InvalidInputError
from sprintrt.specs import COMPONENTS, TEXT_ENCODER, TRANSFORMER


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
QUANTIZED = (P.INT8, P.FP8)  # built from a calibrated Q/DQ graph (engines/quantize.py)
# Why a component is never built in a precision, whatever the backend (the message of the refusal).
WHY_NOT = {(TEXT_ENCODER, P.FP16): "Gemma2 overflows fp16 (its docs: the text encoder must stay in bf16)",
           (TRANSFORMER, P.FP8): "fp8 runs on TensorRT only (GPUs of compute capability >= 8.9); the CPU backends have no fp8 kernels"}


@dataclass(frozen=True)
class PrecisionRequest:
    """What `--precision` (or `precision=`) asks for: one precision for every component, and/or some
    components' own; components it does not name keep the backend's defaults. The one parser of it."""

    everything: Precision | None = None
    components: Mapping[str, Precision] = field(default_factory=dict)

    @classmethod
    def parse(cls, value) -> "PrecisionRequest":
        """None, a Precision, "int8", "transformer=fp16,vae_decoder=fp32", {component: precision}, or a request."""
        if value is None or isinstance(value, PrecisionRequest):
            return value or cls()
        if isinstance(value, Mapping):
            return cls(None, {_component(k): Precision.parse(v) for k, v in value.items()})
        text = value.value if isinstance(value, Precision) else str(value)
        if "=" not in text:
            return cls(Precision.parse(text))
        per = {}
        for part in text.split(","):
            name, _, prec = part.partition("=")
            per[_component(name.strip())] = Precision.parse(prec)
        return cls(None, per)

    def precisions(self) -> set[Precision]:
        """Every precision the request names."""
        return {*([self.everything] if self.everything else []), *self.components.values()}

    @property
    def calibrates(self) -> bool:
        """Whether it asks for a calibrated Q/DQ component (int8/fp8); int8w (weights only) needs no calibration."""
        return any(p in QUANTIZED for p in self.precisions())

    def __bool__(self) -> bool:
        return bool(self.everything or self.components)


def _component(name: str) -> str:
    if name not in COMPONENTS:
        raise InvalidInputError(f"--precision names component {name!r}: expected one of {list(COMPONENTS)}. "
                                "Fix: e.g. --precision transformer=fp16,vae_decoder=fp32")
    return name


def resolve_precisions(value, backend: str, components=COMPONENTS, defaults=None) -> dict[str, Precision]:
    """Per-component precisions from a request (see PrecisionRequest.parse; None: the defaults).

    `defaults` ({component: Precision}) defaults to the backend module's `default_precisions()` for a
    machine not known yet; `build_engines` passes the ones for this machine and library version."""
    from sprintrt.engines.registry import backend_module, canonical

    backend = canonical(backend)
    mod = backend_module(backend)
    request = PrecisionRequest.parse(value)
    chosen = dict(defaults or mod.default_precisions())
    if request.everything is not None:
        chosen = {c: request.everything for c in COMPONENTS}
    chosen.update(request.components)
    for comp in components:
        p, allowed = chosen[comp], mod.ALLOWED[comp]
        if p not in allowed:
            why = WHY_NOT.get((comp, p), f"backend {backend!r} builds {[a.value for a in allowed]} for it")
            raise InvalidInputError(f"precision={p.value!r} is not available for {comp} on backend {backend!r}: {why}. "
                                    f"Fix: choose one of {[a.value for a in allowed]}")
    return {c: chosen[c] for c in components}


def components_in(allowed: Mapping[str, tuple], precision: Precision) -> str:
    """The components a backend's ALLOWED table builds in `precision`, for people: "every component" or names."""
    names = [c for c, ps in allowed.items() if precision in ps]
    return "every component" if len(names) == len(allowed) else ", ".join(c.replace("_", " ") for c in names)


def quantized_precisions(value, backend: str) -> dict[str, Precision]:
    """Precisions for a quantized build: "int8" / "fp8" alone means every component with a Q/DQ recipe
    that `backend` builds in it (the others keep the backend's defaults); a per-component request is
    taken as given. At least one component must be quantized."""
    from sprintrt.engines.quantize import QUANTIZABLE
    from sprintrt.engines.registry import backend_module, canonical

    request = PrecisionRequest.parse(value)
    if request.everything is not None:
        one, name = request.everything, canonical(backend)
        per = {c: one for c in QUANTIZABLE if one in backend_module(name).ALLOWED[c]}
        if not per:
            raise InvalidInputError(f"precision={one.value!r}: no component is quantized to {one.value} on backend "
                                    f"{name!r}. Fix: e.g. --precision transformer=int8 (fp8 needs a GPU backend)")
        request = PrecisionRequest(None, per)
    chosen = resolve_precisions(request, backend)
    if not any(p in QUANTIZED for p in chosen.values()):
        raise InvalidInputError(f"precision={value!r} quantizes no component: expected int8 or fp8 for at least one "
                                "of them. Fix: e.g. --precision transformer=int8")
    return chosen


@dataclass(frozen=True)
class EngineChoice:
    """A backend and a precision, as `--candidates` and the tuner name them ("ort:int8"); `auto` (no
    precision) stands for the tuner's per-component choice."""

    backend: str
    precision: Precision | None

    @property
    def name(self) -> str:
        return self.backend if self.precision is None else f"{self.backend}:{self.precision.value}"

    @classmethod
    def parse(cls, text: str, default: Precision | None = None) -> "EngineChoice":
        """'ort:int8' / 'openvino:fp32' / 'auto' → EngineChoice; 'ort' takes `default` (None: refused). A typed
        error names the bad part."""
        from sprintrt.engines.registry import AUTO, canonical

        backend, _, precision = text.strip().partition(":")
        if backend == AUTO and not precision:
            return cls(AUTO, None)
        if not precision and default is None:
            raise InvalidInputError(f"candidate {text!r} is not BACKEND:PRECISION. Fix: e.g. ort:fp32,ov:bf16,ort:int8")
        return cls(canonical(backend), Precision.parse(precision or default))
