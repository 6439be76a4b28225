"""Latents → pixels through the VAE-decoder engine, whole, sliced (one image at a time) or tiled.

Slicing and tiling mirror AutoencoderDC's `enable_slicing()` / `enable_tiling()` in diffusers: the
same tiles (512 px with a 448 px stride by default, i.e. 16 latents with a stride of 14 for DC-AE's
32x compression), the same linear blend of the overlaps, applied in place in the same order, so a
tiled image equals diffusers' tiled image. Tiling bounds the decoder's activation memory by the tile
size, which is what makes 4K images decodable on a 24 GB machine; slicing bounds it by one image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sprintrt.errors import invalid


@dataclass(frozen=True)
class Tiling:
    tile_sample_min_height: int = 512
    tile_sample_min_width: int = 512
    tile_sample_stride_height: int = 448
    tile_sample_stride_width: int = 448

    def check(self, scale: int) -> None:
        for name in ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
                     "tile_sample_stride_width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < scale or v % scale:
                raise invalid(name, v, f"a positive multiple of the VAE's {scale}-pixel latent stride", "pass e.g. 512")
        for side in ("height", "width"):
            size, stride = getattr(self, f"tile_sample_min_{side}"), getattr(self, f"tile_sample_stride_{side}")
            if stride > size:
                raise invalid(f"tile_sample_stride_{side}", stride, f"at most tile_sample_min_{side} ({size}), or "
                              "tiles would leave gaps", f"pass a stride <= {size}")


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def tiled_decode(decoder, z: np.ndarray, scale: int, t: Tiling) -> np.ndarray:
    """AutoencoderDC.tiled_decode over an engine: overlapping tiles, blended, cropped to the stride."""
    _, _, height, width = z.shape
    tile_h, tile_w = t.tile_sample_min_height // scale, t.tile_sample_min_width // scale
    stride_h, stride_w = t.tile_sample_stride_height // scale, t.tile_sample_stride_width // scale
    blend_h = t.tile_sample_min_height - t.tile_sample_stride_height
    blend_w = t.tile_sample_min_width - t.tile_sample_stride_width
    rows = [[decoder(np.ascontiguousarray(z[:, :, i:i + tile_h, j:j + tile_w])) for j in range(0, width, stride_w)]
            for i in range(0, height, stride_h)]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, blend_h)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, blend_w)
            parts.append(tile[:, :, :t.tile_sample_stride_height, :t.tile_sample_stride_width])
        out_rows.append(np.concatenate(parts, axis=3))
    return np.concatenate(out_rows, axis=2)


def decode(engine, z: np.ndarray, scale: int, slicing: bool = False, tiling: Tiling | None = None) -> np.ndarray:
    """AutoencoderDC.decode(z) with its slicing/tiling switches, over the VAE-decoder engine."""
    def run(latent: np.ndarray) -> np.ndarray:
        return engine(latent=latent)["sample"]

    def one(latent: np.ndarray) -> np.ndarray:
        if tiling is not None and (latent.shape[3] > tiling.tile_sample_min_width // scale
                                   or latent.shape[2] > tiling.tile_sample_min_height // scale):
            return tiled_decode(run, latent, scale, tiling)
        return run(latent)

    if slicing and z.shape[0] > 1:
        return np.concatenate([one(z[b:b + 1]) for b in range(z.shape[0])])
    return one(z)
