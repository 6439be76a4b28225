"""Calibrated int8 for the ControlNet's two components: calibration recorded in ControlNet calls, the Q/DQ
placement, and images against the diffusers-module reference (tests/runtime/test_controlnet.py's) on ONNX Runtime
and OpenVINO. The Q/DQ graphs for GPUs (int8, fp8) are checked by TensorRT-RTX's parser and builder in
tests/engines/test_tensorrt_cpu.py and test_tensorrt_rtx.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from sprintrt.defaults import intermediate_timesteps_for
from sprintrt.engines.build import build_engines
from sprintrt.engines.quantize import quantizable_nodes, quantize_qdq
from sprintrt.errors import InvalidInputError
from sprintrt.export_info import read_export_info
from sprintrt.metrics import psnr
from sprintrt.prompts import read_prompts
from sprintrt.runtime.image import control_picture
from sprintrt.specs import CONTROLLED_TRANSFORMER, CONTROLNET, VAE_ENCODER
from sprintrt.tuning.calibration import record_calibration

CONTROLLED = (CONTROLNET, CONTROLLED_TRANSFORMER)
PROMPTS = 4
# Measured on the tiny checkpoint, ONNX Runtime and OpenVINO int8 (AMX Xeon): 42-56 dB against fp32 over 1 and
# 2 steps, while the ControlNet itself moves the image to 27-31 dB (scale 0 vs 1). 38 dB leaves room for other
# CPUs' int8 kernels (7-bit weights on AVX2) and is far above a broken quantization (< 25 dB).
INT8_PSNR_DB = 38.0


@pytest.fixture(scope="module")
def calibration(engine_dir):
    from sprintrt import SprintControlNetPipeline

    pipe = SprintControlNetPipeline.from_engines(engine_dir)
    encoder, encoded = pipe.engine(VAE_ENCODER), []

    def counting(**feeds):
        encoded.append(feeds["sample"].copy())
        return encoder(**feeds)

    pipe.set_engine(VAE_ENCODER, counting)
    runs = {c: [] for c in CONTROLLED}
    for comp in CONTROLLED:
        def run(engine=pipe.engine(comp), seen=runs[comp], **feeds):
            seen.append(1)
            return engine(**feeds)
        pipe.set_engine(comp, run)
    feeds = record_calibration(pipe, CONTROLLED, read_prompts(None)[:PROMPTS], 128, 160)
    return feeds, encoded, runs


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from sprintrt.benchmarks.controlnet_reference import SprintControlNetReference

    return SprintControlNetReference.from_pretrained(tiny_checkpoint)


def test_calibration_records_controlnet_calls_with_one_scribble_per_prompt(calibration):
    feeds, encoded, runs = calibration
    assert set(feeds) == set(CONTROLLED)
    for comp in CONTROLLED:
        # each prompt at 1 step and at 2 steps, the 1-step call's input being the 2-step call's first: kept once,
        # and run once; the controlled transformer's last step of a 2-step call is recorded, not run (the latents
        # of calibration's ControlNet calls are not decoded: nothing reads its output)
        assert len(feeds[comp]) == PROMPTS * 2, comp
        assert len(runs[comp]) == PROMPTS * (2 if comp == CONTROLNET else 1), comp
        assert feeds[comp][0]["hidden_states"].shape == (1, 32, 4, 5), comp  # 128x160 / 32
    timesteps = sorted({round(float(f["timestep"][0]), 6) for f in feeds[CONTROLNET]})
    assert timesteps == [0.782708, 1.000004]  # as the transformer's calibration (docs/SANA_SPRINT_SPEC.md §4.5)
    # Each prompt's scribble is its own, encoded once for its three ControlNet calls.
    assert len(encoded) == PROMPTS
    assert all(not np.array_equal(a, b) for a, b in zip(encoded, encoded[1:]))
    latents = [f["controlnet_cond"] for f in feeds[CONTROLNET]]
    assert all(np.array_equal(latents[2 * p], latents[2 * p + 1]) for p in range(PROMPTS))
    assert all(np.abs(f["block_samples"]).max() > 0 for f in feeds[CONTROLLED_TRANSFORMER])  # the residuals


@pytest.mark.parametrize("component", CONTROLLED)
def test_qdq_keeps_the_edges_and_quantizes_every_block_layer(onnx_dir, calibration, component, tmp_path):
    out = tmp_path / f"{component}.qdq.onnx"
    info = quantize_qdq(onnx_dir / f"{component}.onnx", out, calibration[0][component], "int8", component=component,
                        uniform=True)  # where the recipe puts Q/DQ; which blocks stay float as well is measured
    quantize, keep = quantizable_nodes(onnx_dir / f"{component}.onnx", component)
    assert info["quantized_nodes"] == len(quantize) > 0 and info["calibration_samples"] == PROMPTS * 2
    blocks = read_export_info(onnx_dir)["model_dims"]["controlnet_blocks"]
    # patch embed (the ControlNet runs it on the latents and on the control latent), time embedding (3 linears;
    # the transformer's guidance embedding adds 2), caption projection (2), and the edges each writes
    expected = (2 + 1 + 3 + 2 + blocks) if component == CONTROLNET else (1 + 5 + 2 + 1)  # + input_block / proj_out
    assert len(keep) == expected, keep
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    dq_fed = lambda node, k: getattr(producer.get(node.input[k]), "op_type", None) == "DequantizeLinear"  # noqa: E731
    assert all(dq_fed(nodes[n], 0) and dq_fed(nodes[n], 1) for n in quantize)
    assert not any(dq_fed(nodes[n], 0) or dq_fed(nodes[n], 1) for n in keep)


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def int8_dir(request, onnx_dir, calibration, tmp_path_factory):
    precision = {c: "fp32" for c in read_export_info(onnx_dir)["components"]} | {c: "int8" for c in CONTROLLED}
    return build_engines(onnx_dir, tmp_path_factory.mktemp(f"cn-int8-{request.param}") / "e", backend=request.param,
                         precision=precision,
                         calibration={c: ("4 shipped prompts, 128x160", calibration[0][c]) for c in CONTROLLED})


@pytest.mark.parametrize("steps", [1, 2])
def test_int8_controlnet_images_stay_close_to_the_diffusers_modules(int8_dir, reference, steps):
    from sprintrt import SprintControlNetPipeline

    components = json.loads((int8_dir / "manifest.json").read_text())["components"]
    for comp in CONTROLLED:
        assert components[comp]["precision"] == "int8" and components[comp]["calibration_samples"] == PROMPTS * 2
        assert "__int8" in components[comp]["key"]
    pipe = SprintControlNetPipeline.from_engines(int8_dir)
    for seed, prompt in ((5, "a lighthouse at dusk"), (6, "a bowl of fruit")):
        # a size, scribble and seed the calibration never saw
        kw = dict(prompt=prompt, control_image=control_picture(256, 192, seed=100 + seed), height=256, width=192,
                  num_inference_steps=steps, intermediate_timesteps=intermediate_timesteps_for(steps),
                  use_resolution_binning=False, output_type="np")
        ref = reference(**kw, generator=torch.Generator().manual_seed(seed)).images
        ours = pipe(**kw, generator=torch.Generator().manual_seed(seed)).images
        off = reference(**kw, controlnet_conditioning_scale=0.0, generator=torch.Generator().manual_seed(seed)).images
        assert np.abs(ours - ref).max() > 0  # int8 really ran
        assert psnr(ours, ref) >= INT8_PSNR_DB
        assert psnr(ours, ref) > psnr(off, ref) + 6  # far closer than the ControlNet's own effect


def test_int8_of_a_controlnet_the_export_lacks_is_a_typed_error_before_any_work(onnx_dir, tmp_path):
    import shutil

    from sprintrt.tuning.calibration import build_quantized_engines

    plain = tmp_path / "onnx"
    shutil.copytree(onnx_dir, plain, ignore=shutil.ignore_patterns("controlnet*", "controlled_transformer*"))
    info = json.loads((plain / "export_info.json").read_text())
    info["components"] = {c: r for c, r in info["components"].items() if c not in CONTROLLED}
    (plain / "export_info.json").write_text(json.dumps(info))
    for precision in ("controlnet=int8", "transformer=int8,controlnet=int8"):  # named: never dropped silently
        with pytest.raises(InvalidInputError, match=r"names \['controlnet'\].*has no export of.*--controlnet"):
            build_quantized_engines(plain, tmp_path / "e", precision=precision, count=1, size=128)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e*"))
