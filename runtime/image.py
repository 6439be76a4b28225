"""Resolution binning, resize-back and post-processing in NumPy (docs/SANA_SPRINT_SPEC.md §3.1, §5.3, §5.4)."""

from __future__ import annotations

import numpy as np

from sprintrt.export.specs import ASPECT_RATIO_1024_BIN


def classify_height_width_bin(height: int, width: int, ratios=ASPECT_RATIO_1024_BIN) -> tuple[int, int]:
    """The bin whose ratio is closest to height/width (first one wins ties, as in diffusers)."""
    ar = float(height / width)
    closest = min(ratios.keys(), key=lambda r: abs(float(r) - ar))
    h, w = ratios[closest]
    return int(h), int(w)


def _bilinear_taps(in_size: int, out_size: int):
    """Source indices and weights of torch's bilinear, align_corners=False, no antialias."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """F.interpolate(x, (height, width), mode='bilinear', align_corners=False) for NCHW float32."""
    h0, h1, hw0, hw1 = _bilinear_taps(x.shape[2], height)
    w0, w1, ww0, ww1 = _bilinear_taps(x.shape[3], width)
    rows = x[:, :, h0, :] * hw0[None, None, :, None] + x[:, :, h1, :] * hw1[None, None, :, None]
    return rows[:, :, :, w0] * ww0 + rows[:, :, :, w1] * ww1


def resize_and_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale to cover (height, width), then centre-crop: diffusers' resize_and_crop_tensor."""
    in_h, in_w = x.shape[2], x.shape[3]
    if (in_h, in_w) == (height, width):
        return x
    ratio = max(height / in_h, width / in_w)
    rh, rw = int(in_h * ratio), int(in_w * ratio)
    x = resize_bilinear(x, rh, rw)
    top, left = (rh - height) // 2, (rw - width) // 2
    return x[:, :, top:top + height, left:left + width]


def postprocess(x: np.ndarray, output_type: str):
    """[-1, 1] NCHW → 'np' NHWC float32 in [0, 1], or a list of PIL images."""
    x = np.clip(x * np.float32(0.5) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1).astype(np.float32)
    if output_type == "np":
        return x
    from PIL import Image

    return [Image.fromarray(img) for img in (x * 255).round().astype(np.uint8)]
