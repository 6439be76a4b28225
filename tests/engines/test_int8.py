"""INT8 (static Q/DQ) transformer engines on ONNX Runtime: where the Q/DQ goes, what it costs, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from sprintrt.engines.build import build_engines
from sprintrt.engines.quantize import quantizable_nodes, quantize_qdq
from sprintrt.defaults import intermediate_timesteps_for
from sprintrt.errors import InvalidInputError
from sprintrt.export_info import read_export_info
from sprintrt.tuning.calibration import transformer_calibration
from sprintrt.metrics import cosine, psnr
from sprintrt.prompts import read_prompts
from sprintrt.runtime.pipeline import SprintPipeline
from sprintrt.specs import SPEC_BUILDERS, ModelDims

# Measured on the tiny checkpoint with 6 calibration prompts: 52-57 dB against diffusers fp32 over
# 1 and 2 steps. 40 dB (max |diff| ~ 0.01 in [0, 1]) is far above what a broken quantization gives
# (< 20 dB) and leaves room for other seeds and prompts.
INT8_PSNR_DB = 40.0


@pytest.fixture(scope="module")
def calibration_feeds(engine_dir):
    return transformer_calibration(SprintPipeline.from_engines(engine_dir), read_prompts(None)[:6], 256, 256)


@pytest.fixture(scope="module")
def int8_engine_dir(onnx_dir, calibration_feeds, tmp_path_factory):
    return build_engines(onnx_dir, tmp_path_factory.mktemp("int8") / "engines", precision="transformer=int8",
                         calibration={"transformer": ("6 shipped prompts, 256px", calibration_feeds)})


def test_calibration_records_the_timesteps_actually_run(calibration_feeds):
    # each prompt at 1 step and at 2 steps, the 1-step call's input being the 2-step call's first: kept once
    assert len(calibration_feeds) == 6 * 2
    timesteps = sorted({round(float(f["timestep"][0]), 6) for f in calibration_feeds})
    assert timesteps == [0.782708, 1.000004]  # sflow at t = 1.3 and at t = max (docs/SANA_SPRINT_SPEC.md §4.5)
    assert calibration_feeds[0]["hidden_states"].shape == (1, 32, 8, 8)


@pytest.mark.parametrize("components, prompts, made", [
    (("transformer", "vae_decoder"), 2, 2 * 2),  # every call decoded: per prompt the 2-step call's two steps
    (("transformer", "vae_decoder"), 6, 2 * 4 + 6 - 4),  # 8 calls decoded: prompts 4 and 5's 2-step calls are not
    (("transformer",), 2, 2)])  # nothing decoded: per prompt its 1-step call's run
def test_calibration_runs_a_repeated_transformer_input_once(engine_dir, monkeypatch, components, prompts, made):
    """A prompt's 2-step call starts with its 1-step call's transformer input: the engine runs it once. The last
    step of a 2-step call whose latents are not decoded is recorded, not run (nothing reads its output). What is
    recorded (the transformer's inputs, the decoder's latents made from its outputs) is what running every step
    records."""
    import contextlib

    from sprintrt.tuning import calibration
    from sprintrt.tuning.calibration import record_calibration

    pipe = SprintPipeline.from_engines(engine_dir)
    transformer, runs = pipe.engine("transformer"), []

    def counting(**feeds):
        runs.append(feeds["timestep"].copy())
        return transformer(**feeds)

    pipe.set_engine("transformer", counting)
    prompts = read_prompts(None)[:prompts]
    once = record_calibration(pipe, components, prompts, 128, 160)
    assert len(runs) == made
    monkeypatch.setattr(calibration, "_repeats_run_once",
                        lambda pipe, components: contextlib.nullcontext(calibration._Runs()))
    again = record_calibration(pipe, components, prompts, 128, 160)
    assert len(runs) == made + 3 * len(prompts)
    for component in once:
        assert len(once[component]) == len(again[component]) > 0
        for a, b in zip(once[component], again[component]):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), component


def test_qdq_wraps_every_quantized_layer_and_none_of_the_kept_ones(onnx_dir, calibration_feeds, tmp_path):
    """Where the recipe puts Q/DQ (its uniform form: which of these layers stay in float as well is measured, below)."""
    out = tmp_path / "t.qdq.onnx"
    info = quantize_qdq(onnx_dir / "transformer.onnx", out, calibration_feeds, "int8", component="transformer",
                        uniform=True)
    quantize, keep = quantizable_nodes(onnx_dir / "transformer.onnx", "transformer")
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}

    def dq_fed(node, k):
        src = producer.get(node.input[k])
        return src is not None and src.op_type == "DequantizeLinear"

    assert info["quantized_nodes"] == len(quantize) > 0
    for name in quantize:
        assert dq_fed(nodes[name], 0) and dq_fed(nodes[name], 1), name  # activation and weight
    for name in keep:
        assert not dq_fed(nodes[name], 0) and not dq_fed(nodes[name], 1), name
    kept_ops = " ".join(keep)
    assert len(keep) == 9 and "node_conv2d" in kept_ops  # patch embed, 5 time/guidance linears, 2 caption, proj_out
    # activation x activation matmuls (linear attention, cross-attention scores) are never quantized
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.name not in quantize:
            assert not dq_fed(n, 1)


@pytest.mark.parametrize("steps", [1, 2])
def test_int8_images_stay_close_to_diffusers(int8_engine_dir, reference_pipe, steps):
    manifest = json.loads((int8_engine_dir / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["precision"] == "int8"
    assert manifest["components"]["vae_decoder"]["precision"] == "fp32"
    pipe = SprintPipeline.from_engines(int8_engine_dir)
    for prompt in ("a tiger walking in tall grass", "a bowl of ramen with an egg"):
        kw = dict(prompt=prompt, num_inference_steps=steps, intermediate_timesteps=intermediate_timesteps_for(steps),
                  height=256, width=192, use_resolution_binning=False, output_type="np")
        ref = reference_pipe(**kw, generator=torch.Generator().manual_seed(3)).images
        ours = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
        assert np.abs(ours - ref).max() > 0  # int8 really ran
        assert psnr(ours, ref) >= INT8_PSNR_DB


def test_int8_key_names_the_calibration(int8_engine_dir):
    entry = json.loads((int8_engine_dir / "manifest.json").read_text())["components"]["transformer"]
    assert "__int8-" in entry["key"] and entry["calibration"] == "6 shipped prompts, 256px"
    assert entry["calibration_samples"] == 12


def test_int8_needs_calibration(onnx_dir, tmp_path):
    with pytest.raises(InvalidInputError, match="int8 for transformer needs calibration"):
        build_engines(onnx_dir, tmp_path / "e", precision="transformer=int8")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("content,match", [(None, "does not exist"), ("", "has no prompts"), ("\n  \n", "has no prompts")])
def test_bad_calibration_files(tmp_path, content, match):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidInputError, match=match):
        read_prompts(path)


def test_cli_refuses_empty_calibration_file_and_fp8_on_cpu(onnx_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "build", str(onnx_dir), "-o", str(tmp_path / "e"),
                        "--precision", "transformer=int8", "--calibration-prompts", str(empty)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "has no prompts" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "build", str(onnx_dir), "-o", str(tmp_path / "f"),
                        "--precision", "transformer=fp8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "precision='fp8' is not available for transformer" in r.stderr
    assert not (tmp_path / "f").exists()


def test_engine_from_an_external_data_source_is_self_contained(onnx_dir, tmp_path):
    """Real transformers have external weights; their int8 Q/DQ graph is temporary. The built engine must
    carry its own weights file, not point into the deleted source's (measured on the real 0.6B)."""
    import shutil

    from sprintrt.engines import ort_build
    from sprintrt.engines.precision import Precision

    src = tmp_path / "src" / "transformer.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(onnx_dir / "transformer.onnx")), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="transformer.onnx.data", size_threshold=1024)
    out = tmp_path / "engine" / "t.ort.onnx"
    out.parent.mkdir()
    ort_build.build_component(src, out, "transformer", Precision.FP32, {}, {}, {})
    shutil.rmtree(src.parent)
    import onnxruntime as ort

    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # loads without the source
    assert (out.parent / "t.ort.onnx.data").exists()


# FP8 (E4M3, for TensorRT on Ada/Hopper) cannot run in ONNX Runtime's CPU provider, so its numerics
# are checked with onnx.reference. Measured on the tiny transformer: cosine 0.998-0.999 against the
# fp32 graph on held-out inputs; a broken scale or a quantized normaliser gives < 0.9.
FP8_MIN_COSINE = 0.99


def test_fp8_qdq_in_onnx_reference_stays_close_to_fp32(onnx_dir, engine_dir, calibration_feeds, tmp_path):
    from onnx.reference import ReferenceEvaluator

    out = tmp_path / "t.fp8.onnx"
    info = quantize_qdq(onnx_dir / "transformer.onnx", out, calibration_feeds, "fp8", component="transformer")
    quantize, keep = quantizable_nodes(onnx_dir / "transformer.onnx", "transformer")
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert info["quantized_nodes"] == len(quantize) and q_nodes
    for n in q_nodes:  # float8 E4M3 zero points: the Q/DQ pairs are fp8, not int8
        assert inits[n.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
    nodes = {n.name: n for n in model.graph.node}
    for name in keep:
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in nodes[name].input)

    # Held-out inputs: other prompts, another image size than the calibration's 256 px.
    held_out = transformer_calibration(SprintPipeline.from_engines(engine_dir), ["a glass of orange juice",
                                                                              "a castle on a hill at dusk"], 192, 160)
    fp32, fp8 = ReferenceEvaluator(str(onnx_dir / "transformer.onnx")), ReferenceEvaluator(str(out))
    for feeds in held_out[:3]:
        a, b = fp32.run(None, feeds)[0].astype(np.float64), fp8.run(None, feeds)[0].astype(np.float64)
        c = cosine(a, b)
        assert FP8_MIN_COSINE <= c < 1.0, c  # < 1: fp8 really changed the numbers


def test_unknown_qdq_precision_is_a_typed_error(onnx_dir, calibration_feeds, tmp_path):
    with pytest.raises(InvalidInputError, match="no Q/DQ recipe"):
        quantize_qdq(onnx_dir / "transformer.onnx", tmp_path / "x.onnx", calibration_feeds, "int4",
                     component="transformer")
    assert list(tmp_path.iterdir()) == []


def test_drift_report_isolates_the_quantized_component(engine_dir, int8_engine_dir, tmp_path):
    """fp32 vs itself: every component identical (cosine 1, max |diff| 0). int8 transformer: only the
    transformer drifts (the fp32 text encoder and VAE, fed the reference's inputs, stay identical),
    and the image PSNR stays above the INT8 threshold."""
    from sprintrt.benchmarks import drift as D

    doc = D.run_drift(engine_dir, {"fp32": engine_dir, "int8": int8_engine_dir}, ["a red barn", "an owl at night"],
                      [0, 1], size=192, steps=2, say=lambda *a: None)
    same, int8 = doc["systems"]
    for c in ("text_encoder", "transformer", "vae_decoder"):
        assert same["components"][c]["cosine_min"] == pytest.approx(1.0, abs=1e-12)
        assert same["components"][c]["max_abs"] == 0
    assert same["image_psnr_db"]["min"] > 80  # trimmed text padding vs full: reduction order only
    assert int8["components"]["text_encoder"]["max_abs"] == int8["components"]["vae_decoder"]["max_abs"] == 0
    tr = int8["components"]["transformer"]
    assert tr["precision"] == "int8" and tr["samples"] == 2 * 2 * 2  # prompts x seeds x steps
    assert 0.99 < tr["cosine_min"] < 1 and tr["max_abs"] > 0
    assert INT8_PSNR_DB <= int8["image_psnr_db"]["min"] < 100
    paths = D.write_outputs(doc, tmp_path / "drift.json")
    md = paths[1].read_text()
    assert "| int8 | text_encoder | onnxruntime fp32 |" in md and "transformer | onnxruntime int8" in md


def test_quantized_build_reuses_its_engine_without_calibrating_again(onnx_dir, tmp_path, monkeypatch):
    """The calibration description is in the key; a second build with the same settings must neither
    record calibration data (minutes at real size) nor rebuild, and leaves no scratch directory."""
    import sprintrt.tuning.calibration as C

    out = tmp_path / "q"
    C.build_quantized_engines(onnx_dir, out, count=2, size=128, precision="transformer=int8")
    first = json.loads((out / "manifest.json").read_text())["components"]["transformer"]
    assert first["precision"] == "int8" and first["calibration_samples"] == 2 * 2

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(C, "_record", no_calibration)  # what every recording runs
    monkeypatch.setattr(C, "record_calibration", no_calibration)
    C.build_quantized_engines(onnx_dir, out, count=2, size=128, precision="transformer=int8")
    again = json.loads((out / "manifest.json").read_text())["components"]["transformer"]
    assert again["key"] == first["key"] and again["sha256"] == first["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# ---- int8 on CPUs without VNNI (the recipe follows the target's int8 instructions) -----------------------

XEON = {"kind": "cpu", "arch": "x86_64", "name": "Xeon", "isa": ["avx2", "avx512_bf16", "avx512_vnni", "avx512f"]}
EPYC = {"kind": "cpu", "arch": "x86_64", "name": "AMD EPYC", "isa": ["avx2", "fma"]}
ARM = {"kind": "cpu", "arch": "aarch64", "name": "Neoverse", "isa": ["asimd"]}
H100 = {"kind": "gpu", "name": "NVIDIA H100", "compute_capability": "9.0"}


def _vpmaddubsw_dot(a_u8: np.ndarray, w_s8: np.ndarray) -> int:
    """An x86 int8 dot product without VNNI, as ONNX Runtime's AVX2 kernels compute it: u8 x s8 products
    added in pairs into a saturating int16 (VPMADDUBSW), then summed in int32 (VPMADDWD)."""
    prod = a_u8.astype(np.int32) * w_s8.astype(np.int32)
    pairs = np.clip(prod[0::2] + prod[1::2], -32768, 32767)
    return int(pairs.sum())


def test_the_recipe_follows_the_targets_int8_instructions():
    from sprintrt.engines.quantize import recipe

    assert recipe("int8", EPYC) == "int8-w7"  # VPMADDUBSW saturates: 7-bit weights
    assert recipe("int8", XEON) == recipe("int8", ARM) == "int8"
    assert recipe("int8", H100) == "int8-fbias"  # TensorRT's parser takes no int32 bias DequantizeLinear
    assert recipe("fp8", H100) == "fp8"


def test_saturation_is_the_cause_and_7_bit_weights_cannot_saturate():
    """Machine-independent: full-range int8 weights overflow VPMADDUBSW's int16 pair sums on realistic
    activations; weights within [-64, 64] never do (255 * 64 * 2 = 32640 <= 32767)."""
    rng = np.random.default_rng(0)
    a = rng.integers(200, 256, size=256).astype(np.uint8)  # large activations (u8 after ORT's +128 shift)
    w8 = rng.integers(100, 128, size=256).astype(np.int8)
    exact = int(a.astype(np.int32) @ w8.astype(np.int32))
    assert _vpmaddubsw_dot(a, w8) < exact  # saturated: the loss the AVX2 machines showed
    for _ in range(20):
        a = rng.integers(0, 256, size=512).astype(np.uint8)
        w7 = rng.integers(-64, 65, size=512).astype(np.int8)
        assert _vpmaddubsw_dot(a, w7) == int(a.astype(np.int32) @ w7.astype(np.int32))


def _int8_weights(path) -> list[np.ndarray]:
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]


@pytest.mark.parametrize("target,limit", [(EPYC, 64), (XEON, 127)])
def test_qdq_weights_use_the_recipes_range(onnx_dir, calibration_feeds, tmp_path, target, limit):
    out = tmp_path / "t.onnx"
    info = quantize_qdq(onnx_dir / "transformer.onnx", out, calibration_feeds, "int8", target=target,
                        component="transformer", uniform=True)
    assert info["quantization_recipe"] == ("int8-w7" if limit == 64 else "int8")
    weights = _int8_weights(out)
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == limit


def test_onnxruntime_int8_kernels_agree_with_the_qdq_math_on_this_cpu(onnx_dir, calibration_feeds, tmp_path):
    """On this machine's CPU, the recipe's graph run through ORT's fused int8 kernels equals the same
    Q/DQ graph run op by op in float (ORT_ENABLE_BASIC: no int8 kernel). Saturating kernels broke this
    on an AVX2 EPYC with 8-bit weights (cosine to fp32 0.9985 fused vs 0.99993 op by op)."""
    import onnxruntime as ort

    out = tmp_path / "t.onnx"
    # this machine's recipe
    quantize_qdq(onnx_dir / "transformer.onnx", out, calibration_feeds, "int8", component="transformer")
    runs = {}
    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
        runs[level] = [session.run(None, f)[0] for f in calibration_feeds[:3]]
    for unfused, fused in zip(runs["ORT_ENABLE_BASIC"], runs["ORT_ENABLE_ALL"]):
        assert cosine(fused, unfused) > 0.9999


def test_int8_manifest_names_the_recipe_for_this_cpu(int8_engine_dir):
    from sprintrt import machine
    from sprintrt.engines.quantize import recipe

    entry = json.loads((int8_engine_dir / "manifest.json").read_text())["components"]["transformer"]
    expected = recipe("int8", machine.cpu_target(), "transformer")
    assert expected.endswith("-mixed")  # its int8 layers are chosen by measurement (below)
    assert entry["quantization_recipe"] == expected and f"__{expected}-" in entry["key"]


# ---- int8 beyond the transformer: the VAE decoder's convolutions and the text encoder's projections --------

# Measured on the tiny checkpoint (6 calibration prompts at 256 px, drift at 192 px, 2 steps): component
# cosine vs fp32 text encoder 0.9966, transformer 0.9999, VAE decoder 0.99938 (its int8 blocks chosen by
# measured sensitivity; the uniform recipe gave 0.9883); image PSNR vs the fp32 engines 42.0-42.9 dB with all
# three in int8 (VAE decoder alone 46.0-46.3; uniform: 32.3-33.2). A broken scale or a quantized conv_out
# gives < 20 dB.
INT8_MIN_COSINE = {"text_encoder": 0.99, "transformer": 0.999, "vae_decoder": 0.999}
ALL_INT8_PSNR_DB = 38.0


@pytest.fixture(scope="module")
def all_int8_dir(onnx_dir, tmp_path_factory):
    """`--precision int8`: every component in int8 (each has a recipe; the ControlNet's two too)."""
    from sprintrt.tuning.calibration import build_quantized_engines

    return build_quantized_engines(onnx_dir, tmp_path_factory.mktemp("all-int8") / "engines", count=6, size=256)


@pytest.mark.parametrize("component,kept_scopes", [("vae_decoder", ["conv_in", "conv_out"]),
                                                    ("vae_encoder", ["conv_in", "conv_out"]), ("text_encoder", [])])
def test_qdq_placement_beyond_the_transformer(onnx_dir, all_int8_dir, component, kept_scopes):
    from sprintrt.onnx_scopes import module_scopes

    source = onnx.load(str(onnx_dir / f"{component}.onnx"))
    quantize, keep = quantizable_nodes(source, component)
    scopes = module_scopes(source)
    by_name = {n.name: n for n in source.graph.node}
    assert sorted(scopes[by_name[k].output[0]].split(".")[-2] for k in keep) == kept_scopes
    assert len(quantize) > 0
    entry = json.loads((all_int8_dir / "manifest.json").read_text())["components"][component]
    assert entry["precision"] == "int8"
    if component.startswith("vae_"):  # the measured recipe keeps some more blocks in float (see below)
        assert entry["kept_high_precision"][:len(keep)] == keep and 0 < entry["quantized_nodes"] <= len(quantize)
        assert entry["quantized_nodes"] + len(entry["kept_high_precision"]) == len(quantize) + len(keep)
    else:
        assert entry["quantized_nodes"] == len(quantize) and entry["kept_high_precision"] == keep


def test_the_decoders_int8_layers_are_chosen_by_measured_sensitivity(onnx_dir, all_int8_dir):
    """Issue #29: a uniform int8 decoder loses the picture (tiny: cosine 0.988, 32-34 dB); each block is
    measured alone and only the ones the gate can afford are quantized, verified together."""
    from sprintrt.engines.sensitivity import MAX_VERIFY_ROUNDS, Gate, layer_groups
    from sprintrt.onnx_scopes import module_scopes

    entry = json.loads((all_int8_dir / "manifest.json").read_text())["components"]["vae_decoder"]
    assert entry["quantization_recipe"].endswith("-mixed") and f"__{entry['quantization_recipe']}-" in entry["key"]
    report = entry["int8_sensitivity"]
    source = onnx.load(str(onnx_dir / "vae_decoder.onnx"), load_external_data=False)
    quantize, _ = quantizable_nodes(source, "vae_decoder")
    scopes = {n.name: module_scopes(source)[n.output[0]] for n in source.graph.node if n.name in set(quantize)}
    groups = layer_groups(quantize, scopes, "vae_decoder")
    assert set(report["groups"]) == set(groups) and len(groups) == 11  # tiny DC-AE: 6 stages' blocks (no upsample at the top)
    chosen = [g for g, row in report["groups"].items() if row["quantized"]]
    assert 0 < len(chosen) < len(groups)  # the random tiny decoder affords some blocks, not all
    assert entry["quantized_nodes"] == sum(len(groups[g]) for g in chosen)
    assert all(row["mse"] > 0 and row["macs"] > 0 for row in report["groups"].values())
    assert report["shared_pairs"] == {}  # every Q/DQ pair of DC-AE's is read within one block
    assert Gate().passes(report["verified"]["psnr_db"], report["verified"]["cosine"])
    assert 1 <= report["verify_rounds"] <= MAX_VERIFY_ROUNDS
    assert 0 < report["quantized_macs_share"] < 1


def test_the_mixed_int8_decoder_keeps_the_picture_on_held_out_latents(engine_dir, all_int8_dir):
    """Issue #29's image gate on latents it was not calibrated on (other sizes too): >= 40 dB and cosine >=
    0.999 against the fp32 decoder (measured on the tiny checkpoint: 44-47 dB; the uniform recipe 32-34 dB)."""
    from sprintrt.manifest import read_manifest
    from sprintrt.runtime.registry import load_engine

    fp32, int8 = (load_engine(read_manifest(d), "vae_decoder") for d in (engine_dir, all_int8_dir))
    rng = np.random.default_rng(7)
    for h, w in ((6, 5), (12, 12)):
        latent = (rng.standard_normal((2, 32, h, w)) / 0.41407).astype(np.float32)
        ref, got = fp32(latent=latent)["sample"], int8(latent=latent)["sample"]
        assert psnr(got, ref, peak=2.0) >= 40.0 and cosine(got, ref) >= 0.999, (h, w, psnr(got, ref, peak=2.0))


def test_the_measured_choice_is_reproducible_and_an_unreachable_gate_is_a_typed_error(onnx_dir, engine_dir, tmp_path,
                                                                                       monkeypatch):
    from sprintrt.engines import sensitivity
    from sprintrt.tuning.calibration import record_calibration

    feeds = record_calibration(SprintPipeline.from_engines(engine_dir), ("vae_decoder",), read_prompts(None)[:2],
                               256, 256, steps=(1,))["vae_decoder"]
    source = onnx_dir / "vae_decoder.onnx"
    first, second = (quantize_qdq(source, tmp_path / f"{i}.onnx", feeds, component="vae_decoder") for i in range(2))
    assert first["kept_high_precision"] == second["kept_high_precision"]
    assert onnx.load(str(tmp_path / "0.onnx")).graph == onnx.load(str(tmp_path / "1.onnx")).graph
    real_gate = sensitivity.Gate
    monkeypatch.setattr(sensitivity, "Gate", lambda: real_gate(min_psnr_db=500.0, min_cosine=1.0))  # unreachable
    with pytest.raises(InvalidInputError, match="keep the vae_decoder in a float precision"):
        quantize_qdq(source, tmp_path / "never.onnx", feeds, component="vae_decoder")
    assert not (tmp_path / "never.onnx").exists()  # nothing half-written


def test_the_uniform_recipe_quantizes_every_allowed_layer_without_measuring(onnx_dir, tmp_path, monkeypatch):
    """The tuner's speed probe (tuning/tune.py `_Trials.probe`): every layer the recipe allows in int8, no
    sensitivity run, a recipe name and engine key of its own (it is never reused as a calibrated engine)."""
    from sprintrt.engines import quantize, sensitivity

    feed = {"latent": np.random.default_rng(0).standard_normal((1, 32, 4, 4)).astype(np.float32)}
    monkeypatch.setattr(sensitivity, "choose_quantized", lambda *a, **k: pytest.fail("measured a uniform graph"))
    source = onnx_dir / "vae_decoder.onnx"
    info = quantize_qdq(source, tmp_path / "uniform.onnx", [feed], component="vae_decoder", uniform=True)
    allowed, kept = quantizable_nodes(source, "vae_decoder")
    assert info["quantized_nodes"] == len(allowed) and info["kept_high_precision"] == kept
    assert "int8_sensitivity" not in info and not info["quantization_recipe"].endswith("-mixed")
    labels = {quantize.recipe_label("int8", None, "vae_decoder", "same", uniform) for uniform in (False, True)}
    assert len(labels) == 2


def test_drift_of_every_int8_component(engine_dir, all_int8_dir):
    from sprintrt.benchmarks import drift as D

    doc = D.run_drift(engine_dir, {"int8": all_int8_dir}, ["a red barn", "an owl at night"], [0, 1], size=192,
                      steps=2, say=lambda *a: None)
    (int8,) = doc["systems"]
    for comp, min_cosine in INT8_MIN_COSINE.items():
        got = int8["components"][comp]
        assert got["precision"] == "int8" and min_cosine <= got["cosine_min"] < 1.0, (comp, got["cosine_min"])
    assert ALL_INT8_PSNR_DB <= int8["image_psnr_db"]["min"] < 60


def test_vae_calibration_uses_capped_centre_crops(engine_dir):
    from sprintrt.defaults import VAE_CALIBRATION_LATENT_SIDE, VAE_CALIBRATION_SAMPLES
    from sprintrt.tuning.calibration import record_calibration

    pipe = SprintPipeline.from_engines(engine_dir)
    prompts = read_prompts(None)[:VAE_CALIBRATION_SAMPLES]  # x 2 schedules: more calls than the cap
    feeds = record_calibration(pipe, ("text_encoder", "vae_decoder"), prompts, 512, 384, steps=(1, 2))
    assert len(feeds["text_encoder"]) == len(prompts)
    # The text encoder is calibrated on every token, the instruction's too (no cached prefix as its past),
    # and the pipeline reuses the prefix again afterwards.
    assert not any(f["past_attention_mask"].any() for f in feeds["text_encoder"])
    assert pipe.reuse_instruction_prefix
    assert len(feeds["vae_decoder"]) == VAE_CALIBRATION_SAMPLES
    side = VAE_CALIBRATION_LATENT_SIDE
    assert {f["latent"].shape for f in feeds["vae_decoder"]} == {(1, 32, side, side)}  # 16 x 12 latents, cropped


def test_vae_encoder_calibration_is_pictures_and_scribbles_cropped_alike(engine_dir):
    """What the VAE encoder encodes in use: pictures (img2img; here the calibration calls' latent crops, decoded)
    and scribbles (ControlNet), as many of each, prepared as the pipelines do, at the crop's size."""
    from sprintrt.defaults import VAE_CALIBRATION_LATENT_SIDE
    from sprintrt.tuning.calibration import record_calibration

    feeds = record_calibration(SprintPipeline.from_engines(engine_dir), ("vae_encoder",), read_prompts(None)[:3],
                               384, 320, steps=(1, 2))["vae_encoder"]
    side = VAE_CALIBRATION_LATENT_SIDE * 32
    calls = 3  # a picture per prompt (its 2 schedules give nearly the same one; under the cap)
    assert len(feeds) == 2 * calls and {f["sample"].shape for f in feeds} == {(1, 3, side, side)}
    pictures, scribbles = feeds[:calls], feeds[calls:]
    assert all(not np.array_equal(a["sample"], b["sample"]) for a, b in zip(feeds, feeds[1:]))
    assert all(-1 <= f["sample"].min() and f["sample"].max() <= 1 for f in feeds)
    assert all(np.mean(f["sample"] == -1.0) < 0.5 for f in pictures)  # decoded images
    assert all(np.mean(f["sample"] == -1.0) > 0.5 for f in scribbles)  # white strokes on black


def test_the_encoders_int8_layers_are_chosen_by_measured_sensitivity(all_int8_dir, engine_dir):
    """The decoder's method on the VAE encoder, gated on its latent's cosine alone (it is not a picture); held-out
    pictures and scribbles at other sizes keep the tuner's gate (measured on the tiny checkpoint: 90% of the
    multiply-adds in int8, verified cosine 0.9996)."""
    from sprintrt.defaults import TUNE_MIN_COSINE
    from sprintrt.manifest import read_manifest
    from sprintrt.runtime.image import control_picture, preprocess_image
    from sprintrt.runtime.registry import load_engine

    entry = json.loads((all_int8_dir / "manifest.json").read_text())["components"]["vae_encoder"]
    report = entry["int8_sensitivity"]
    assert entry["quantization_recipe"].endswith("-mixed") and report["gate"]["min_psnr_db"] is None
    assert len(report["groups"]) == 11 and 0 < report["quantized_macs_share"] <= 1
    assert report["verified"]["cosine"] >= report["gate"]["min_cosine"]
    fp32, int8 = (load_engine(read_manifest(d), "vae_encoder") for d in (engine_dir, all_int8_dir))
    rng = np.random.default_rng(11)
    smooth = np.cumsum(np.cumsum(rng.standard_normal((1, 3, 192, 160)), axis=2), axis=3)
    smooth = ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)
    for pixels in (preprocess_image("array", smooth, 192, 160),
                   preprocess_image("pil", [control_picture(256, 224, seed=99)], 256, 224)):
        ref, got = fp32(sample=pixels)["latent"], int8(sample=pixels)["latent"]
        assert np.abs(got - ref).max() > 0 and cosine(got, ref) >= TUNE_MIN_COSINE, cosine(got, ref)


@pytest.mark.parametrize("component,blocks", [("transformer", 2), ("controlled_transformer", 2), ("controlnet", 1)])
def test_the_transformer_familys_int8_layers_are_chosen_by_measured_sensitivity(onnx_dir, all_int8_dir, component,
                                                                                 blocks):
    """The decoder's method on the Sana transformer family (issue #29: a uniform int8 transformer missed the tuner's
    gate at real size), one group per part of each block (self-attention, cross-attention, feed-forward), gated on
    the output's cosine alone; what the recipe keeps in float stays there, and the groups it leaves in float too."""
    from sprintrt.engines.sensitivity import Gate, layer_groups
    from sprintrt.onnx_scopes import module_scopes

    entry = json.loads((all_int8_dir / "manifest.json").read_text())["components"][component]
    report = entry["int8_sensitivity"]
    assert entry["quantization_recipe"].endswith("-mixed") and f"__{entry['quantization_recipe']}-" in entry["key"]
    assert report["gate"]["min_psnr_db"] is None and report["verified"]["psnr_db"] is None
    assert report["verified"]["cosine"] >= Gate().min_cosine
    source = onnx.load(str(onnx_dir / f"{component}.onnx"), load_external_data=False)
    quantize, keep = quantizable_nodes(source, component)
    scopes = {n.name: module_scopes(source)[n.output[0]] for n in source.graph.node if n.name in set(quantize)}
    groups = layer_groups(quantize, scopes, component)
    assert list(report["groups"]) == list(groups) == [f"transformer_blocks.{b}.{part}" for b in range(blocks)
                                                      for part in ("attn1", "attn2", "ff")]
    assert all(row["mse"] > 0 and row["macs"] > 0 for row in report["groups"].values())
    chosen = [g for g, row in report["groups"].items() if row["quantized"]]
    assert chosen and entry["quantized_nodes"] == sum(len(groups[g]) for g in chosen)
    assert entry["kept_high_precision"][:len(keep)] == keep
    assert sorted(entry["kept_high_precision"][len(keep):]) == sorted(n for g in groups if g not in chosen
                                                                      for n in groups[g])


def test_a_graph_without_visible_weight_layers_is_refused(onnx_dir, tmp_path):
    """ONNX Runtime reads an empty nodes_to_quantize as "quantize every node": a graph whose weights all
    sit behind Transposes (the real-size exports before the Transposes were folded) must be refused,
    not quantized wholesale."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(onnx_dir / "text_encoder.onnx"))
    weights = {i.name for i in graph.graph.initializer}
    nodes = []
    for n in graph.graph.node:  # hide every weight behind an Identity, as Transposes hid them
        if n.op_type == "MatMul" and n.input[1] in weights:
            hidden = n.input[1] + "_hidden"
            nodes.append(helper.make_node("Identity", [n.input[1]], [hidden]))
            n.input[1] = hidden
        nodes.append(n)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    path = tmp_path / "hidden.onnx"
    onnx.save(graph, str(path))
    with pytest.raises(InvalidInputError, match="quantize nothing.*re-export"):
        quantizable_nodes(path, "text_encoder")


@pytest.mark.parametrize("component", ["text_encoder", "transformer"])
def test_every_quantized_matmul_runs_as_an_int8_kernel(onnx_dir, all_int8_dir, component):
    """Found on an AMD EPYC Zen 3 (AVX2, no VNNI): ONNX Runtime fused none of the int8 text encoder's weight MatMuls
    (74 DequantizeLinear kept, every weight dequantized on every call; the real 0.6B int8 text encoder ran 10x
    slower than fp32). Two causes: quantized MatMul outputs (a Q after the MatMul rules out MatMulIntegerToFloat)
    and s8 activations shared by several layers (q/k/v, gate/up), which ONNX Runtime's S8->U8 rewrite skips, so
    its u8 kernels could not take them (on an AMX Xeon with VNNI too, whose graphs keep s8 activations: 4 of the tiny
    text encoder's 14 fused). The recipe now leaves MatMul outputs in float, quantizes activations as u8 where int8
    saturates, and the ONNX Runtime build makes the others u8 (engines/ort_build.py u8_activations).
    Checked on the built engine, which is ONNX Runtime's own optimized graph: every quantized MatMul is a
    MatMulIntegerToFloat and no weight is dequantized."""
    from collections import Counter

    source = onnx.load(str(onnx_dir / f"{component}.onnx"))
    quantized = set(quantizable_nodes(source, component)[0])
    matmuls = sum(1 for n in source.graph.node if n.name in quantized and n.op_type == "MatMul")
    entry = json.loads((all_int8_dir / "manifest.json").read_text())["components"][component]
    graph = onnx.load(str(all_int8_dir / entry["file"]), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert matmuls > 0 and ops["MatMulIntegerToFloat"] == matmuls, (matmuls, ops)
    initializers = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    dequantized_weights = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in producer
                           and producer[n.input[1]].op_type == "DequantizeLinear"
                           and producer[n.input[1]].input[0] in initializers]
    assert dequantized_weights == [], dequantized_weights


def _sensitivity_feeds(component: str, calibration_feeds: list[dict], seed: int) -> list[dict]:
    """Two inputs of `component` unlike the export's sample shapes (the transformer's: two calibration calls)."""
    rng = np.random.default_rng(seed)
    if component == "transformer":
        return calibration_feeds[1:3]  # 8x8 latents, both timesteps of the 2-step schedule
    if component == "vae_decoder":
        return [{"latent": rng.standard_normal((1, 32, 4, 6)).astype(np.float32)} for _ in range(2)]
    return [{"sample": rng.uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32)} for _ in range(2)]


def _source_with_weights_in_a_file(onnx_dir, component: str, tmp_path):
    """The tiny transformer laid out as the real one is (over 2 GB its weights are in a file beside it)."""
    if component != "transformer":
        return onnx_dir / f"{component}.onnx"
    src = tmp_path / "src" / "transformer.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(onnx_dir / "transformer.onnx")), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="transformer.onnx.data", size_threshold=1024)
    return src


@pytest.mark.parametrize("component", ["vae_decoder", "transformer"])
def test_sensitivity_variants_equal_the_quantizers_own_graphs(onnx_dir, calibration_feeds, tmp_path, component):
    """The per-group graphs the sensitivity measures are derived from one all-layers Q/DQ graph (engines/
    sensitivity.py Variants); each must compute what ONNX Runtime's quantizer gives for the same layers. The
    transformer's cross-attentions all read one quantized caption: a group chosen alone keeps that pair for itself."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from sprintrt.engines import quantize as Q
    from sprintrt.engines.calibrator import calibrated_ranges
    from sprintrt.engines.sensitivity import Variants, _run, layer_groups
    from sprintrt.onnx_scopes import module_scopes

    source = _source_with_weights_in_a_file(onnx_dir, component, tmp_path)
    feeds = _sensitivity_feeds(component, calibration_feeds, 0)
    settings = Q._settings("int8", len(feeds), None, component)
    cache = tmp_path / "ranges.json"
    calibrated_ranges(source, feeds, settings, cache)
    proto = onnx.load(str(source), load_external_data=False)
    nodes, _ = quantizable_nodes(proto, component)
    by_output = module_scopes(proto)
    groups = layer_groups(nodes, {n.name: by_output[n.output[0]] for n in proto.graph.node if n.name in nodes},
                          component)
    external = component == "transformer"

    def write(chosen, path):
        quantize_static(str(source), str(path), None, quant_format=QuantFormat.QDQ, nodes_to_quantize=chosen,
                        calibration_cache_path=str(cache), use_external_data_format=external, **settings)

    write(nodes, tmp_path / "all.onnx")
    variants = Variants(tmp_path / "all.onnx", source, Q.UNQUANTIZED_OUTPUTS)
    fp32 = _run(source, feeds)
    names = list(groups)
    # decoder: an attention block, a ResBlock, a mix, everything; transformer: a self-attention, a feed-forward,
    # a cross-attention alone (the caption's shared pair), one with another block's self-attention, everything
    picks = (names[1:5],) if component == "vae_decoder" else ([names[1]], names[1:5:2])
    for chosen in ([names[0]], [names[-1]], *picks, names):
        members = [n for g in chosen for n in groups[g]]
        write(members, tmp_path / "one.onnx")
        expected, got = _run(tmp_path / "one.onnx", feeds), _run(variants(members), feeds)
        for e, g, f in zip(expected, got, fp32):
            assert np.abs(g - e).max() <= 1e-6 * np.abs(e).max() and np.abs(e - f).max() > 1e-4, chosen


def test_the_sensitivity_maps_weights_from_their_file_and_dequantizes_each_weight_once(onnx_dir, calibration_feeds,
                                                                                      tmp_path):
    """The sensitivity's graphs read the weights in a file by mapping it (sensitivity._arrays: the values onnx's own
    loader gives), and each weight's and bias's DequantizeLinear is computed once, when Variants is made: no variant
    dequantizes a weight again, a chosen layer reads its dequantized weights, the same values the Q/DQ graph's
    DequantizeLinear gives, and an unchosen one its fp32 weights."""
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantFormat, quantize_static

    from sprintrt.engines import quantize as Q
    from sprintrt.engines.calibrator import calibrated_ranges
    from sprintrt.engines.sensitivity import Variants, _arrays

    source = _source_with_weights_in_a_file(onnx_dir, "transformer", tmp_path)
    proto = onnx.load(str(source), load_external_data=False)
    arrays, loaded = _arrays(proto, source.parent), onnx.load(str(source))
    external = {i.name for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    assert external and all(isinstance(arrays[name], np.memmap) for name in external)
    assert all(np.array_equal(arrays[i.name], numpy_helper.to_array(i)) for i in loaded.graph.initializer)
    outside = onnx.ModelProto()
    outside.CopyFrom(proto)
    for init in outside.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../" + entry.value
    with pytest.raises(ValueError, match="not beside the graph"):  # as onnx's own loader refuses it
        _arrays(outside, source.parent)
    feeds = _sensitivity_feeds("transformer", calibration_feeds, 0)
    settings = Q._settings("int8", len(feeds), None, "transformer")
    calibrated_ranges(source, feeds, settings, tmp_path / "ranges.json")
    nodes, _ = quantizable_nodes(proto, "transformer")
    quantize_static(str(source), str(tmp_path / "all.onnx"), None, quant_format=QuantFormat.QDQ,
                    nodes_to_quantize=nodes, calibration_cache_path=str(tmp_path / "ranges.json"),
                    use_external_data_format=True, **settings)
    variants = Variants(tmp_path / "all.onnx", source, Q.UNQUANTIZED_OUTPUTS)
    full = onnx.load(str(tmp_path / "all.onnx"))
    weight_dq = [n for n in full.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in {i.name for i in full.graph.initializer}]
    assert set(variants.dequantized) == {n.output[0] for n in weight_dq}
    chosen = nodes[: len(nodes) // 2]
    variant = variants._nodes(chosen)
    assert not [n for n in variant if n.op_type == "DequantizeLinear" and n.input[0] in variants.constants]
    reads = {n.name: set(n.input) for n in variant}
    for layer in nodes:
        weight = set(variants.source_inputs[layer][1:])
        dequantized = reads[layer] & set(variants.dequantized)
        assert dequantized if layer in chosen else not dequantized and reads[layer] & {
            variants.float_name.get(w, w) for w in weight}, layer
    # the values: what the Q/DQ graph's own DequantizeLinear gives, bit for bit
    probe = onnx.ModelProto()
    probe.CopyFrom(full)
    probe.graph.ClearField("output")
    probe.graph.output.extend(onnx.ValueInfoProto(name=n.output[0]) for n in weight_dq[:8])
    onnx.save_model(probe, str(tmp_path / "probe.onnx"))
    got = dict(zip(variants.names, variants.values))
    for n, value in zip(weight_dq[:8], _run_all(tmp_path / "probe.onnx", feeds[0])):
        assert np.array_equal(got[n.output[0]].numpy(), value), n.name


def _run_all(path, feed) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("component", ["vae_decoder", "vae_encoder", "transformer"])
def test_sensitivity_runs_only_what_each_groups_change_reaches_with_the_same_output(onnx_dir, calibration_feeds,
                                                                                    tmp_path, component):
    """Each group's sensitivity run is only the nodes quantizing it changes, fed the fp32 graph's values of what
    they read (sensitivity.py Variants.suffix): its output must be the whole variant's, bit for bit, and the runs
    must skip work (the encoder's first blocks and the decoder's last are the large ones, the transformer's
    blocks alike). Each is run as the measurement runs it: a shared Q/DQ pair measured alone, left in float in
    its readers' groups. The transformer's weights are in a file, as the real one's (over 2 GB) are."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from sprintrt.engines import quantize as Q
    from sprintrt.engines.calibrator import calibrated_ranges
    from sprintrt.engines.sensitivity import Variants, _fp32_pass, _run, layer_groups, measured_alone
    from sprintrt.onnx_scopes import module_scopes

    source = _source_with_weights_in_a_file(onnx_dir, component, tmp_path)
    feeds = _sensitivity_feeds(component, calibration_feeds, 1)[:1]
    settings = Q._settings("int8", len(feeds), None, component)
    cache, kept = tmp_path / "ranges.json", []
    calibrated_ranges(source, feeds, settings, cache, outputs=kept)
    proto = onnx.load(str(source), load_external_data=False)
    nodes, _ = quantizable_nodes(proto, component)
    by_output = module_scopes(proto)
    groups = layer_groups(nodes, {n.name: by_output[n.output[0]] for n in proto.graph.node if n.name in nodes},
                          component)
    quantize_static(str(source), str(tmp_path / "all.onnx"), None, quant_format=QuantFormat.QDQ,
                    nodes_to_quantize=nodes, calibration_cache_path=str(cache),
                    use_external_data_format=component == "transformer", **settings)
    variants = Variants(tmp_path / "all.onnx", source, Q.UNQUANTIZED_OUTPUTS)
    alone = measured_alone(groups, variants.shared_pairs(groups))
    assert len(alone) == len(groups) + (component == "transformer")  # the caption's pair
    cuts = {g: variants.cut(*chosen) for g, chosen in alone.items()}
    reference, macs, values = _fp32_pass(variants, nodes, sorted({c for cut in cuts.values() for c in cut}), feeds, 1)
    whole_nodes = suffix_nodes = 0
    fp32 = _run(source, feeds)[0]
    assert np.array_equal(reference[0], fp32)  # the pass's extra outputs change nothing
    assert len(kept) == 1 and np.array_equal(kept[0], fp32)  # nor do the calibration's (its kept reference)
    assert set(macs) == set(nodes) and all(m > 0 for m in macs.values())
    for group, (members, pairs) in alone.items():
        assert cuts[group], group  # every group starts after the input: something is skipped
        whole = _run(variants(members, pairs), feeds)[0]
        cut_feeds = [{**feeds[0], **{c: values[0][c] for c in cuts[group]}}]
        types = {c: onnx.helper.np_dtype_to_tensor_dtype(values[0][c].dtype) for c in cuts[group]}
        suffix = variants.suffix(members, types, pairs)
        assert np.array_equal(_run(suffix, cut_feeds)[0], whole), group
        assert not np.array_equal(whole, fp32), group  # the group's quantization shows in the output
        whole_nodes += len(onnx.load_from_string(variants(members, pairs).proto).graph.node)
        suffix_nodes += len(onnx.load_from_string(suffix.proto).graph.node)
    assert suffix_nodes < 0.75 * whole_nodes, (suffix_nodes, whole_nodes)


def test_fp8_of_a_graph_over_2_gb_below_opset_19_is_converted_without_its_weights(onnx_dir, tmp_path, monkeypatch):
    """fp8 Q/DQ needs opset 19. ONNX Runtime's quantizer converts a graph below it with its weights loaded, through
    onnx's version converter, which serialises the whole model: past 2 GB protobuf fails (the real 0.6B
    transformer, opset 18: "Failed to serialize proto"). The stand-in here: a converter that fails on any graph
    holding weights, and the tiny transformer with its weights in a file. quantize_qdq converts the graph without
    its weights beside them first: the same Q/DQ graph as from the graph holding its weights, nothing left beside
    the source."""
    from onnx import version_converter

    from sprintrt.engines import quantize as Q

    model = onnx.load(str(onnx_dir / "transformer.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < Q.FP8_OPSET
    big = tmp_path / "src" / "transformer.onnx"
    big.parent.mkdir()
    onnx.save_model(model, str(big), save_as_external_data=True, location="transformer.onnx.data")
    spec = SPEC_BUILDERS["transformer"](ModelDims.from_json(read_export_info(onnx_dir)["model_dims"]))
    feeds = [spec.sample_inputs(spec.sizes("sample"), seed=s) for s in (0, 1)]
    inline = quantize_qdq(onnx_dir / "transformer.onnx", tmp_path / "inline.onnx", feeds, "fp8", target=H100,
                          component="transformer")
    convert = version_converter.convert_version

    def weightless_only(graph, target):
        if any(len(init.raw_data) > 1024 for init in graph.graph.initializer):
            raise ValueError("Failed to serialize proto")  # what protobuf says past 2 GB
        return convert(graph, target)

    monkeypatch.setattr(version_converter, "convert_version", weightless_only)
    external = quantize_qdq(big, tmp_path / "external.onnx", feeds, "fp8", target=H100, component="transformer")
    assert external == inline and external["quantized_nodes"] > 0
    a, b = (onnx.load(str(tmp_path / f"{name}.onnx")) for name in ("inline", "external"))
    assert {o.version for o in b.opset_import if o.domain in ("", "ai.onnx")} == {Q.FP8_OPSET}
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in b.graph.initializer)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert sorted(p.name for p in big.parent.iterdir()) == ["transformer.onnx", "transformer.onnx.data"]
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(big.parent)
                        and writable(path, mode))
    for precision in ("fp8", "int8"):  # root may write anywhere: an unwritable export directory is simulated
        with pytest.raises(InvalidInputError, match=f"{big.parent} is not writable. Fix: make that directory"):
            quantize_qdq(big, tmp_path / "never.onnx", feeds, precision, target=H100, component="transformer")
    assert not (tmp_path / "never.onnx").exists()


def test_the_sensitivity_never_serialises_a_graph_with_its_weights(onnx_dir, calibration_feeds, tmp_path,
                                                                   monkeypatch):
    """Protobuf cannot serialise a graph past 2 GB (the real transformers' are 2.4 GB in fp32): every session the
    measurement runs gets its weights as shared values, never inside the serialised graph. Stand-in for the limit:
    a session given a serialised graph that holds a weight fails."""
    from sprintrt.engines import sensitivity

    real_session, sessions = sensitivity._session, []

    def session(model):
        if isinstance(model, bytes):
            big = [i.name for i in onnx.load_from_string(model).graph.initializer if len(i.raw_data) >= 1024]
            assert not big, f"Failed to serialize proto (stand-in): {big[:3]}"
        sessions.append(model)
        return real_session(model)

    monkeypatch.setattr(sensitivity, "_session", session)
    source = _source_with_weights_in_a_file(onnx_dir, "transformer", tmp_path)
    info = quantize_qdq(source, tmp_path / "t.onnx", calibration_feeds[:4], component="transformer")
    assert info["int8_sensitivity"]["groups"] and len(sessions) > len(info["int8_sensitivity"]["groups"])


def test_the_measurement_takes_its_fp32_reference_from_the_calibration_run(onnx_dir, calibration_feeds, tmp_path,
                                                                        monkeypatch):
    """The calibration has run the fp32 graph on every input already: the sensitivity keeps those outputs as its
    reference and runs its own fp32 pass on the per-group samples alone. The report must be the one a full fp32
    pass gives, every error equal bit for bit (so the calibration's session computes the graph as the
    measurement's sessions do)."""
    from sprintrt.defaults import INT8_SENSITIVITY_SAMPLES
    from sprintrt.engines import sensitivity

    real_pass, passed = sensitivity._fp32_pass, []

    def fp32_pass(variants, nodes, cut, feeds, few):
        passed.append(len(feeds))
        return real_pass(variants, nodes, cut, feeds, few)

    monkeypatch.setattr(sensitivity, "_fp32_pass", fp32_pass)
    source = _source_with_weights_in_a_file(onnx_dir, "transformer", tmp_path)
    feeds = calibration_feeds[:4]
    kept = quantize_qdq(source, tmp_path / "kept.onnx", feeds, component="transformer")["int8_sensitivity"]
    real_choice = sensitivity.choose_quantized
    monkeypatch.setattr(sensitivity, "choose_quantized",  # given no reference: its fp32 pass runs on every feed
                        lambda *args, reference=None, **kwargs: real_choice(*args, **kwargs))
    whole = quantize_qdq(source, tmp_path / "whole.onnx", feeds, component="transformer")["int8_sensitivity"]
    assert passed == [INT8_SENSITIVITY_SAMPLES, len(feeds)]
    assert kept == whole and kept["samples"]["verified"] == len(feeds)
    assert onnx.load(str(tmp_path / "kept.onnx")).graph == onnx.load(str(tmp_path / "whole.onnx")).graph


def test_a_failed_verification_leaves_out_as_many_of_the_largest_errors_as_the_miss_says():
    from sprintrt.engines.sensitivity import Gate, _leave_out_largest

    gate = Gate()
    table = {g: {"mse": e} for g, e in zip("abcd", (4.0, 3.0, 2.0, 1.0))}
    allowed = 1 - gate.min_cosine
    chosen = list("dcba")
    _leave_out_largest(chosen, table, gate, float("inf"), 1 - 2 * allowed, picture=False)  # twice the cosine allowed
    assert chosen == ["d", "c"]  # sum 10 -> 3 <= 10 / 2 (a alone leaves 6)
    chosen = list("abcd")
    _leave_out_largest(chosen, table, gate, gate.min_psnr_db - 10, 1.0, picture=True)  # 10 dB short: 10x the mse
    assert chosen == ["d"]
    chosen = list("abcd")
    _leave_out_largest(chosen, table, gate, float("inf"), 1 - 0.5 * allowed, picture=False)  # a miss below 1x
    assert chosen == ["b", "c", "d"]  # still one per round
    zero = {g: {"mse": 0.0} for g in "ab"}
    chosen = ["a", "b"]
    _leave_out_largest(chosen, zero, gate, float("inf"), 1 - 2 * allowed, picture=False)
    assert len(chosen) == 1


def test_a_pair_several_groups_read_is_measured_alone_and_counted_once(onnx_dir, calibration_feeds, tmp_path,
                                                                        monkeypatch):
    """ONNX Runtime's quantizer gives the transformer's caption one Q/DQ pair, which every cross-attention reads
    once any of them is quantized. The measurement finds that pair (and no other), measures it alone, leaves it
    in float in each cross-attention's own run, which is then only what that cross-attention's keys and values
    reach, and the greedy counts its error once: the chosen groups' errors and the pair's fit the budget."""
    from sprintrt.engines import sensitivity
    from sprintrt.onnx_scopes import module_scopes

    made = []

    class Kept(sensitivity.Variants):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(sensitivity, "Variants", Kept)
    source = _source_with_weights_in_a_file(onnx_dir, "transformer", tmp_path)
    report = quantize_qdq(source, tmp_path / "t.onnx", calibration_feeds[:4],
                          component="transformer")["int8_sensitivity"]
    proto = onnx.load(str(source), load_external_data=False)
    nodes, _ = quantizable_nodes(proto, "transformer")
    scopes = module_scopes(proto)
    groups = sensitivity.layer_groups(nodes, {n.name: scopes[n.output[0]] for n in proto.graph.node
                                              if n.name in nodes}, "transformer")
    cross = [g for g in groups if g.endswith(".attn2")]
    shared = made[0].shared_pairs(groups)
    assert len(shared) == 1 and list(shared.values()) == [cross] and len(cross) >= 2
    (caption,) = shared
    alone = sensitivity.measured_alone(groups, shared)  # what is measured: the pair in float in each reader's run
    assert alone[cross[0]] == (groups[cross[0]], {caption: False}) and alone[next(iter(groups))][1] == {}
    assert list(alone)[len(groups):] == [f"the Q/DQ pair of {caption}"]
    assert alone[list(alone)[-1]] == ([], {caption: True})
    # the pair alone: one Q/DQ pair and no weight quantized
    alone = made[0]._nodes((), {caption: True})
    assert [n.op_type for n in alone if n.op_type in ("QuantizeLinear", "DequantizeLinear")] == \
        ["QuantizeLinear", "DequantizeLinear"]
    # the last cross-attention's own run is its block's keys and values and what they reach, not every block's as
    # with the pair
    last = groups[cross[-1]]
    own, with_pair = (len(made[0]._split(last, pairs)[0]) for pairs in ({caption: False}, None))
    assert own < 0.5 * with_pair, (own, with_pair)
    assert len(report["groups"]) == len(groups)
    pair = report["shared_pairs"][caption]
    assert pair["groups"] == len(cross) and pair["mse"] > 0
    chosen = [g for g, row in report["groups"].items() if row["quantized"]]
    assert pair["quantized"] == any(g in cross for g in chosen)
    assert sum(report["groups"][g]["mse"] for g in chosen) + pair["mse"] * pair["quantized"] <= report["budget_mse"]


def test_the_vae_encoders_groups_are_measured_on_a_picture_and_a_scribble(onnx_dir, tmp_path, monkeypatch):
    """The encoder's calibration inputs are pictures, then as many scribbles (tuning/calibration.py): its groups are
    measured on the first of each, the others' on their first input; the chosen set is verified on every input,
    whatever their order."""
    from sprintrt.engines import sensitivity
    from sprintrt.engines.sensitivity import per_group_samples

    assert per_group_samples("vae_encoder", 16) == [0, 8] and per_group_samples("vae_encoder", 1) == [0]
    assert per_group_samples("vae_decoder", 8) == [0] and per_group_samples("transformer", 32) == [0]
    real_pass, passed = sensitivity._fp32_pass, []

    def fp32_pass(variants, nodes, cut, feeds, few):
        passed.append(feeds[:few])
        return real_pass(variants, nodes, cut, feeds, few)

    monkeypatch.setattr(sensitivity, "_fp32_pass", fp32_pass)
    rng = np.random.default_rng(3)
    feeds = [{"sample": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)} for _ in range(4)]
    source = onnx_dir / "vae_encoder.onnx"
    report = quantize_qdq(source, tmp_path / "e.onnx", feeds, component="vae_encoder")["int8_sensitivity"]
    assert report["samples"]["per_group_inputs"] == [0, 2] and len(passed) == 1
    assert [f["sample"] is g["sample"] for f, g in zip(passed[0], (feeds[0], feeds[2]))] == [True, True]
    outputs, reference = (np.concatenate([o.ravel() for o in sensitivity._run(m, feeds)])
                          for m in (tmp_path / "e.onnx", source))
    assert report["verified"]["cosine"] == pytest.approx(cosine(outputs, reference), abs=2e-6)
