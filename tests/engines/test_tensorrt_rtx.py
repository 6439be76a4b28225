"""TensorRT for RTX: real engines built here, on a CPU, by sprintrt's own build, and every exported graph checked by
its ONNX parser. Running the engines needs an RTX GPU (`rtx_gpu` tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sprintrt import machine
from sprintrt.engines.build import build_engines
from sprintrt.errors import EngineDirError, ExportValidationError, InvalidInputError, MissingDependencyError
from sprintrt.export_info import read_export_info
from sprintrt.manifest import read_manifest
from sprintrt.specs import COMPONENTS, TEXT_ENCODER

pytestmark = pytest.mark.rtx

# What TensorRT-RTX builds per precision (fp16 never for Gemma2), and the compute capabilities it needs.
PRECISIONS = {"fp32": COMPONENTS, "bf16": COMPONENTS, "fp16": tuple(c for c in COMPONENTS if c != TEXT_ENCODER),
              "int8w": COMPONENTS}


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def test_every_exported_graph_parses_in_tensorrt_rtx(typed_onnx_dir):
    from sprintrt.trt_parser import parse_problems

    info = read_export_info(typed_onnx_dir)
    for component, record in info["components"].items():
        assert record["trt_parser"].startswith("tensorrt_rtx "), component  # the export asked the real parser
        for graph in [record, *record["variants"].values()]:
            assert parse_problems(typed_onnx_dir / graph["file"]) == [], graph["file"]


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_engines_for_every_component(typed_onnx_dir, tmp_path, precision):
    """sprintrt's build, the real TensorRT-RTX builder, no GPU: serialized engines for the portable default targets."""
    components = PRECISIONS[precision]
    out = build_engines(typed_onnx_dir, tmp_path / "e", backend="rtx", precision=precision, components=components)
    m = _manifest(out)
    assert set(m["components"]) == set(components)
    for name, entry in m["components"].items():
        assert entry["backend"] == "tensorrt-rtx" and entry["precision"] == precision
        assert entry["target"]["portable_default"] and entry["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"]
        assert entry["bytes"] > 1000 and (out / entry["file"]).read_bytes()[:4] != b"\0\0\0\0"
        base = {"fp32": "", "int8w": ".bf16"}.get(precision, f".{precision}")  # int8w sits on the bf16 variant
        assert entry["source_onnx"]["file"] == f"{name}{base}.onnx"
        if precision == "int8w":
            assert entry["int8w_layers"] > 0  # weight layers did become int8
        assert entry["key"].startswith("TensorRT-RTX-portable-default-sm8.0-8.6-8.9-12.0__tensorrt-rtx1.7")


def test_named_compute_capabilities_and_what_they_refuse(typed_onnx_dir, tmp_path):
    out = build_engines(typed_onnx_dir, tmp_path / "a", backend="tensorrt-rtx", components=("transformer",),
                        target="12.0,8.9")
    entry = _manifest(out)["components"]["transformer"]
    assert entry["compute_capabilities"] == ["8.9", "12.0"] and not entry["target"]["portable_default"]
    assert entry["precision"] == "bf16"
    with pytest.raises(InvalidInputError, match="precision='bf16' cannot run on compute capability 7.5.*from 8.0"):
        build_engines(typed_onnx_dir, tmp_path / "b", backend="rtx", components=("transformer",), target="7.5,8.6",
                      precision="bf16")
    with pytest.raises(InvalidInputError, match="compute capability '9.0' is not one TensorRT-RTX builds for"):
        build_engines(typed_onnx_dir, tmp_path / "c", backend="rtx", target="9.0")
    with pytest.raises(InvalidInputError, match="builds for this machine only"):
        build_engines(typed_onnx_dir, tmp_path / "d", backend="onnxruntime", target="8.9")
    assert not any((tmp_path / d).exists() for d in "bcd")  # refused before anything is written


def test_fp8_needs_every_target_at_8_9_and_builds_there(typed_onnx_dir, tmp_path):
    from sprintrt.tuning.calibration import build_quantized_engines

    with pytest.raises(InvalidInputError, match="fp8.*compute capability 8.0, 8.6.*--compute-capability 8.9,12.0"):
        build_quantized_engines(typed_onnx_dir, tmp_path / "x", count=1, size=128, backend="rtx",
                                precision="transformer=fp8")
    assert not (tmp_path / "x").exists()
    out = build_quantized_engines(typed_onnx_dir, tmp_path / "e", count=2, size=128, backend="rtx",
                                  precision="transformer=fp8", target="8.9,12.0")
    entry = _manifest(out)["components"]["transformer"]
    assert entry["precision"] == "fp8" and entry["qdq_base"] == "bf16" and entry["qdq_layers"] > 0
    assert entry["compute_capabilities"] == ["8.9", "12.0"]


def test_fp8_controlnet_engines_build(typed_onnx_dir, tmp_path):
    """The ControlNet's two components in fp8: calibrated in ControlNet calls, built by the real builder."""
    from sprintrt.tuning.calibration import build_quantized_engines

    out = build_quantized_engines(typed_onnx_dir, tmp_path / "e", count=1, size=128, backend="rtx",
                                  precision="controlnet=fp8,controlled_transformer=fp8", target="8.9,12.0")
    for name in ("controlnet", "controlled_transformer"):
        entry = _manifest(out)["components"][name]
        assert entry["precision"] == "fp8" and entry["qdq_base"] == "bf16" and entry["qdq_layers"] > 0
        assert entry["calibration_samples"] == 2  # one prompt at 1 and 2 steps: the 1-step input is the 2-step's first


def test_cli_builds_tensorrt_rtx_engines_on_a_cpu(typed_onnx_dir, tmp_path):
    out = tmp_path / "rtx"
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "build", str(typed_onnx_dir), "-o", str(out),
                        "--backend", "tensorrt-rtx", "--compute-capability", "8.6,8.9,12.0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = _manifest(out)
    assert {e["precision"] for e in m["components"].values()} == {"bf16"}
    assert {tuple(e["compute_capabilities"]) for e in m["components"].values()} == {("8.6", "8.9", "12.0")}


def _reduce_mean_with_folded_axes(dtype=TensorProto.BFLOAT16) -> onnx.ModelProto:
    """x² averaged over axes that arrive as Reshape(initializer, initializer): what the 16-bit variants held
    before their constants were folded (ONNX Runtime cannot evaluate bf16, so Polygraphy's fold left them)."""
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes_raw")
    shape = numpy_helper.from_array(np.array([1], np.int64), "axes_shape")
    nodes = [helper.make_node("Reshape", ["axes_raw", "axes_shape"], ["axes"], name="axes_reshape"),
             helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["y"], name="mean", keepdims=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, ["b", 8])],
                              [helper.make_tensor_value_info("y", dtype, ["b", 1])], [axes, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_unfolded_reduce_axes_are_caught_by_the_parser_and_repaired_by_the_fold(tmp_path):
    from sprintrt.export.graph_passes import fold_constants_onnxscript
    from sprintrt.trt_parser import parse_problems

    model = _reduce_mean_with_folded_axes()
    onnx.save(model, tmp_path / "raw.onnx")
    (problem,) = parse_problems(tmp_path / "raw.onnx")
    assert "'mean' (ReduceMean)" in problem and "build-time constant" in problem
    assert fold_constants_onnxscript(model) == 1  # the Reshape became an initializer
    onnx.save(model, tmp_path / "folded.onnx")
    assert parse_problems(tmp_path / "folded.onnx") == []


def test_export_refuses_a_graph_the_parser_rejects(tiny_checkpoint, tmp_path, monkeypatch):
    """Without the fold, the bf16 variant keeps its Reshape-made axes: the export names node, op and reason and
    writes nothing."""
    import sprintrt.export.onnx_export as E

    monkeypatch.setattr(E, "fold_constants_onnxscript", lambda *a, **k: 0)
    with pytest.raises(ExportValidationError, match=r"transformer\.bf16\.onnx is rejected by TensorRT's ONNX parser "
                                                    r"\(tensorrt_rtx .*\): node \d+ '.*' \(ReduceMean\)"):
        E.export_model(tiny_checkpoint, tmp_path / "onnx", components=("transformer",), dtypes=("fp32", "bf16"),
                       validate=False)
    assert not list(tmp_path.iterdir())


def test_int8w_weights_round_trip_within_half_a_step(typed_onnx_dir, tmp_path):
    """The weight-only graph computes what the fp32 graph does with int8-stored weights: run in ONNX Runtime
    (fp32 graph, fp32 scales), the transformer's output stays within cosine 0.999 of the fp32 graph's."""
    import onnxruntime as ort

    from sprintrt.engines.weight_only import per_channel_int8, weight_only_int8
    from sprintrt.metrics import cosine
    from sprintrt.specs import SPEC_BUILDERS, ModelDims

    w = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)
    q, scale = per_channel_int8(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (5,)
    assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7  # at most half a quantization step
    info = weight_only_int8(typed_onnx_dir / "transformer.onnx", tmp_path / "w.onnx", "transformer")
    assert info["int8w_layers"] > 0 and info["int8w_kept"] > 0  # the embeddings and projections kept 16-bit
    spec = SPEC_BUILDERS["transformer"](ModelDims.from_json(read_export_info(typed_onnx_dir)["model_dims"]))
    feeds = spec.sample_inputs(spec.sizes("sample"), seed=3)
    ref = ort.InferenceSession(str(typed_onnx_dir / "transformer.onnx")).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "w.onnx")).run(None, feeds)[0]
    assert 0.999 <= cosine(got, ref) < 1.0


def test_tensorrt_rtx_engines_are_refused_without_a_fitting_gpu(typed_onnx_dir, tmp_path, monkeypatch):
    from sprintrt.runtime.registry import check_engines

    out = build_engines(typed_onnx_dir, tmp_path / "e", backend="rtx", components=("vae_decoder",), target="8.6")
    manifest = read_manifest(out)
    if not machine.gpus():
        with pytest.raises(MissingDependencyError, match="no NVIDIA GPU.*RTX GPU"):
            check_engines(manifest, ["vae_decoder"])
    monkeypatch.setattr(machine, "gpus", lambda: [{"kind": "gpu", "name": "NVIDIA GeForce RTX 4090",
                                                   "compute_capability": "8.9", "driver": "580"}])
    with pytest.raises(EngineDirError, match="compute capabilities 8.6; this GPU .*RTX 4090.* has 8.9.*--rebuild"):
        check_engines(manifest, ["vae_decoder"])
    monkeypatch.setattr(machine, "gpus", lambda: [{"kind": "gpu", "name": "NVIDIA GeForce RTX 3090",
                                                   "compute_capability": "8.6", "driver": "580"}])
    check_engines(manifest, ["vae_decoder"])  # the GPU it was built for


@pytest.mark.rtx_gpu
def test_tensorrt_rtx_engines_run_like_onnxruntime(typed_onnx_dir, engine_dir, tmp_path):
    """On an RTX GPU: each fp32 engine's outputs agree with ONNX Runtime's, and the runtime cache is written and
    reused by a second load."""
    from sprintrt.metrics import cosine
    from sprintrt.runtime.registry import load_engine

    out = build_engines(typed_onnx_dir, tmp_path / "e", backend="rtx", precision="fp32")
    rtx, ort_m = read_manifest(out), read_manifest(engine_dir)
    for component in COMPONENTS:
        with load_engine(rtx, component) as engine:
            sizes = {n: b.opt for n, b in engine.limits.items()}
            feeds = engine.spec.sample_inputs(sizes, seed=5)
            got = engine(**feeds)
        with load_engine(ort_m, component) as ref_engine:
            ref = ref_engine(**feeds)
        assert all(cosine(got[k], ref[k]) >= 0.999 for k in ref), component
        assert (out / (rtx.components[component]["file"] + ".runtime-cache")).stat().st_size > 0


def test_a_profile_needing_more_than_8_gib_builds(typed_onnx_dir, tmp_path):
    """Found at the real 0.6B size: the VAE decoder's bf16 profile up to 4 x 2048² asks TensorRT-RTX for 8.9 GB
    and the 8 GiB workspace limit of the full-TensorRT chain refused it ("OutOfMemory"), on any build machine.
    The tiny decoder at the spec's largest profile (8 images of 4096², 8 fp32 channels at full resolution) asks
    for 8.6 GB: with that limit it fails the same way (checked); TensorRT-RTX builds leave the workspace to the
    target GPU."""
    from sprintrt.engines import rtx_build
    from sprintrt.engines.precision import Precision

    shapes = {"latent": {"min": (1, 32, 1, 1), "opt": (1, 32, 32, 32), "max": (8, 32, 128, 128)}}
    out = tmp_path / "vae_decoder.plan"
    rtx_build.build_component(typed_onnx_dir / "vae_decoder.onnx", out, "vae_decoder", Precision.FP32, shapes,
                              rtx_build.build_target(None), rtx_build.library_versions())
    assert out.stat().st_size > 10000
