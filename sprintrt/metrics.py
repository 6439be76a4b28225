"""How outputs are compared: one cosine, one PSNR, one max-abs, used by export validation, drift,
benchmarks, the demo and the tests. NumPy only; every metric works in float64."""

from __future__ import annotations

import numpy as np

# Images of a float32 sprintrt pipeline equal diffusers' within this max |diff| (images in [0, 1]):
# the graphs differ from PyTorch by reduction order only (measured ~2e-6 on the tiny checkpoint).
PARITY_MAX_ABS = 1e-4


def _flat(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


def max_abs(a, b) -> float:
    """max |a - b| (0 for empty arrays)."""
    a, b = _flat(a), _flat(b)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def cosine(a, b) -> float:
    """Cosine similarity of the flattened arrays; two all-zero arrays count as identical (1.0)."""
    a, b = _flat(a), _flat(b)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def psnr(a, b, peak: float = 1.0) -> float:
    """PSNR in dB of two images with values in [0, peak]; inf when they are identical."""
    mse = float(np.mean((_flat(a) - _flat(b)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def compare(out, ref) -> dict:
    """The record every comparison writes: max |diff|, the reference's scale, cosine, finiteness."""
    return {"max_abs": max_abs(out, ref), "ref_max_abs": float(np.max(np.abs(_flat(ref)))) if np.size(ref) else 0.0,
            "cosine": cosine(out, ref), "finite": bool(np.isfinite(_flat(out)).all())}
