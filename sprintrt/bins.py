"""Resolution binning: diffusers' aspect-ratio tables and the bin a requested size falls in
(docs/SANA_SPRINT_SPEC.md §3.1). The runtime bins sizes with them; TensorRT profiles span them."""

from __future__ import annotations

# diffusers' ASPECT_RATIO_1024_BIN (pipelines/pixart_alpha): aspect ratio h/w → [height, width].
ASPECT_RATIO_1024_BIN = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}

# diffusers' ASPECT_RATIO_512_BIN is the 1024 table halved, entry by entry.
ASPECT_RATIO_512_BIN = {k: (h // 2, w // 2) for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}

# The tables by the resolution of the model they are for (TensorRT profiles name the ones to cover).
TABLES = {"1024": ASPECT_RATIO_1024_BIN, "512": ASPECT_RATIO_512_BIN}


def classify_height_width_bin(height: int, width: int, ratios=ASPECT_RATIO_1024_BIN) -> tuple[int, int]:
    """The bin whose ratio is closest to height/width (first one wins ties, as in diffusers)."""
    ar = float(height / width)
    closest = min(ratios.keys(), key=lambda r: abs(float(r) - ar))
    h, w = ratios[closest]
    return int(h), int(w)
