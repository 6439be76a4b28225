"""benchmarks/stage_profile.py: per-stage time and multiply-adds of the VAE decoder against the MatMul rate."""

from __future__ import annotations

import json

import numpy as np

from sprintrt.benchmarks import stage_profile as P


def test_multiply_adds_from_profiled_shapes():
    conv = P._macs("Conv", [{"float": [1, 8, 4, 4]}, {"float": [16, 8, 3, 3]}, {"float": [16]}],
                   [{"float": [1, 16, 4, 4]}])
    assert conv == 16 * 4 * 4 * 8 * 3 * 3
    blocked = P._macs("Conv", [{"float": [1, 1, 4, 4, 8]}, {"float": [2, 1, 3, 3, 8, 8]}], [{"float": [1, 2, 4, 4, 8]}])
    assert blocked == conv  # ONNX Runtime's NCHWc layout: channel blocks x block size
    assert P._macs("MatMul", [{"float": [1, 64, 32]}], [{"float": [1, 64, 48]}]) == 64 * 48 * 32  # x · W
    assert P._macs("MatMul", [{"float": [1, 64, 32]}, {"float": [1, 32, 64]}], [{"float": [1, 64, 64]}]) == 0
    assert P._macs("Add", [{"float": [4]}], [{"float": [4]}]) == 0


def test_the_decoder_profile_names_every_stage_and_counts_its_work(onnx_dir, tmp_path):
    out = tmp_path / "profile.json"
    P.main([str(onnx_dir), "--sizes", "128,256", "-o", str(out)])
    doc = json.loads(out.read_text())
    assert doc["gemm_gflops"] > 0 and doc["cpu"]["kind"] == "cpu"
    small, large = (doc["sizes"][s]["stages"] for s in ("128", "256"))
    stages = {f"decoder.up_blocks.{i}" for i in range(6)} | {"decoder.conv_in", "decoder.conv_out"}
    assert stages <= set(small) and stages <= set(large)
    for stage in ("decoder.up_blocks.0", "decoder.conv_out"):  # convolutions only: 4x the pixels, 4x the work
        assert np.isclose(large[stage]["gmacs"], 4 * small[stage]["gmacs"], rtol=0.02), stage
    assert all(row["seconds"] >= 0 for row in large.values())
    assert sum(r["seconds"] for r in large.values()) <= 1.5 * doc["sizes"]["256"]["seconds"] + 0.05
