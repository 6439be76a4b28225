"""Precision of an engine component, and which backend can build which."""

from __future__ import annotations

from enum import Enum

from sprintrt.errors import InvalidInputError


class Precision(str, Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        try:
            return cls(str(value.value if isinstance(value, Precision) else value).lower())
        except ValueError:
            raise InvalidInputError(
                f"precision={value!r} is not known: expected one of {[p.value for p in cls]}. "
                "Fix: pass e.g. --precision fp32") from None


# What each backend builds today. TensorRT's entry is filled by its builder module.
SUPPORTED = {
    "onnxruntime": (Precision.FP32,),
}


def check_supported(backend: str, precision: Precision) -> None:
    allowed = SUPPORTED.get(backend, ())
    if precision not in allowed:
        raise InvalidInputError(
            f"precision={precision.value!r} is not available on backend {backend!r}: it builds "
            f"{[p.value for p in allowed]}. Fix: choose one of those, or another backend")
