"""TensorRT on a GPU: run with `pytest -m gpu` on a machine with an NVIDIA GPU and TensorRT.

Each test skips on a CPU machine with the reason (see conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sprintrt.metrics import cosine

pytestmark = pytest.mark.gpu

COSINE = 0.999  # bf16/fp16 engines vs fp32 ONNX Runtime, per component output
PSNR_DB = 35.0  # final image of the bf16 TensorRT pipeline vs the fp32 ONNX Runtime pipeline


@pytest.fixture(scope="module")
def trt_engine_dir(typed_onnx_dir, tmp_path_factory):
    from sprintrt.engines.build import build_engines

    return build_engines(typed_onnx_dir, tmp_path_factory.mktemp("trt") / "engines", backend="tensorrt")


def test_builds_every_component(trt_engine_dir):
    m = json.loads((trt_engine_dir / "manifest.json").read_text())
    assert {c["backend"] for c in m["components"].values()} == {"tensorrt"}
    # Strongly typed bf16 engines from the bf16 variants, on every TensorRT version (Ampere and later)
    assert {c["precision"] for c in m["components"].values()} == {"bf16"}
    assert all(c["strongly_typed"] and c["source_onnx"]["file"].endswith(".bf16.onnx") for c in m["components"].values())


@pytest.mark.parametrize("component", ["text_encoder", "transformer", "vae_decoder", "vae_encoder"])
def test_tensorrt_matches_onnxruntime(trt_engine_dir, engine_dir, component):
    from sprintrt.manifest import read_manifest
    from sprintrt.runtime.ort_engine import OrtEngine
    from sprintrt.runtime.engine import component_spec
    from sprintrt.runtime.trt_engine import TrtEngine

    trt_m, ort_m = read_manifest(trt_engine_dir), read_manifest(engine_dir)
    spec = component_spec(trt_m, component)
    prof = trt_m.components[component]["io"]["dims"]
    sizes = {n: d["opt"] for n, d in prof.items()}
    sizes.update({n: min(d["max"], d["opt"] + 1) for n, d in prof.items() if n == "batch"})
    feeds = spec.sample_inputs(sizes, seed=7)
    with TrtEngine(trt_m, component) as trt_engine:
        out = trt_engine(**feeds)
    ref = OrtEngine(ort_m, component)(**feeds)
    for name in out:
        assert cosine(out[name], ref[name]) >= COSINE


def test_pipeline_image_psnr_vs_onnxruntime(trt_engine_dir, sprint_pipe):
    from sprintrt.metrics import psnr
    from sprintrt.runtime.pipeline import SprintPipeline

    kw = dict(prompt="a red fox in snow", num_inference_steps=2, height=512, width=512,
              use_resolution_binning=False, output_type="np")
    pipe = SprintPipeline.from_engines(trt_engine_dir)
    ours = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    ref = sprint_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert psnr(ours, ref) >= PSNR_DB


def test_cuda_graph_equals_plain_path(typed_onnx_dir, tmp_path):
    from sprintrt.engines.build import build_engines
    from sprintrt.engines.profiles import ProfileOptions
    from sprintrt.runtime.pipeline import SprintPipeline

    static = build_engines(typed_onnx_dir, tmp_path / "static", backend="tensorrt",
                           profile=ProfileOptions(max_batch=1, static=(1, 512, 512)))
    kw = dict(prompt="a koi pond", num_inference_steps=2, height=512, width=512, use_resolution_binning=False,
              output_type="np")
    plain = SprintPipeline.from_engines(static)(**kw, generator=0).images
    graphed = SprintPipeline.from_engines(static, cuda_graph=True)
    for _ in range(3):  # run 1 plain, run 2 captures, run 3 replays
        img = graphed(**kw, generator=0).images
        assert np.array_equal(img, plain)


def test_engines_are_reused_across_processes(typed_onnx_dir, trt_engine_dir):
    code = (f"from sprintrt.engines.build import build_engines; ev = []; "
            f"build_engines({str(typed_onnx_dir)!r}, {str(trt_engine_dir)!r}, backend='tensorrt', "
            f"progress=lambda c, w: ev.append(w)); print(ev)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(["reused"] * 3)


def test_stale_engine_is_refused(trt_engine_dir, tmp_path):
    import shutil

    from sprintrt.errors import EngineDirError
    from sprintrt.runtime.pipeline import SprintPipeline

    copy = tmp_path / "stale"
    shutil.copytree(trt_engine_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["components"]["transformer"]["libraries"]["tensorrt"] = "9.0.0"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineDirError, match="tensorrt 9.0.0.*--rebuild"):
        SprintPipeline.from_engines(copy)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_transformer_engine_stays_close(precision, typed_onnx_dir, sprint_pipe, tmp_path):
    """Strongly typed explicit quantization on the bf16 base: the calibrated Q/DQ transformer builds and its
    images stay within the INT8 CPU threshold (40 dB, tests/engines/test_int8.py) of the fp32 ONNX Runtime
    pipeline."""
    from sprintrt.metrics import psnr
    from sprintrt.engines.trt_build import FP8_MIN_COMPUTE_CAPABILITY, target
    from sprintrt.tuning.calibration import build_quantized_engines
    from sprintrt.runtime.pipeline import SprintPipeline

    cc = tuple(int(x) for x in target()["compute_capability"].split("."))
    if precision == "fp8" and cc < FP8_MIN_COMPUTE_CAPABILITY:
        pytest.skip(f"fp8 needs compute capability >= 8.9, this GPU has {cc}")
    out = build_quantized_engines(typed_onnx_dir, tmp_path / "q", count=4, size=256, backend="tensorrt",
                                  precision=f"transformer={precision}")
    entry = json.loads((out / "manifest.json").read_text())["components"]["transformer"]
    assert entry["precision"] == precision and entry["strongly_typed"] and entry["qdq_base"] == "bf16"
    kw = dict(prompt="a red fox in snow", num_inference_steps=1, intermediate_timesteps=None, height=256, width=256,
              use_resolution_binning=False, output_type="np")
    ours = SprintPipeline.from_engines(out)(**kw, generator=torch.Generator().manual_seed(0)).images
    ref = sprint_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert psnr(ours, ref) >= 40.0
