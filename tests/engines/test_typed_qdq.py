"""int8 Q/DQ on a 16-bit base (engines/typed_qdq.py): the fp32 graph's calibrated Q/DQ pairs carried onto
the typed fp16/bf16 variant, and TensorRT's int8 builds starting from it (checked without TensorRT)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sprintrt.engines import trt_build
from sprintrt.engines.build import build_engines
from sprintrt.tuning.calibration import record_calibration
from sprintrt.engines.quantize import quantizable_nodes, quantize_qdq
from sprintrt.engines.typed_qdq import QDQ_MIN_OPSET, pair_layers, qdq_on_variant
from sprintrt.errors import ModelLoadError
from sprintrt.export.trt_lint import lint
from sprintrt.metrics import cosine
from sprintrt.runtime.pipeline import SprintPipeline

FP16 = onnx.TensorProto.FLOAT16
# Measured on the tiny transformer (held-out inputs at another size): fp32 int8 Q/DQ 0.99992, the same
# pairs on the fp16 variant 0.99996 (ORT runs fp16 Q/DQ op by op). The tiny VAE decoder quantizes only the
# blocks its measured sensitivity affords (engines/sensitivity.py; 0.9994 in the pipeline drift); a dropped
# scale or a wrong axis falls far below.
MIN_COSINE = {"transformer": 0.999, "vae_decoder": 0.998}


@pytest.fixture(scope="module")
def feeds(engine_dir):
    pipe = SprintPipeline.from_engines(engine_dir)
    calibration = record_calibration(pipe, ("transformer", "vae_decoder"), ["a red barn", "an owl at night"], 128, 128)
    held_out = record_calibration(pipe, ("transformer", "vae_decoder"), ["a koi pond"], 160, 192, steps=(2,))
    return calibration, held_out


@pytest.fixture(scope="module")
def fp16_qdq(onnx_dir, feeds, tmp_path_factory):
    root = tmp_path_factory.mktemp("qdq16")
    out = {}
    for comp in MIN_COSINE:
        qdq = root / f"{comp}.qdq.onnx"
        quantized = quantize_qdq(onnx_dir / f"{comp}.onnx", qdq, feeds[0][comp], "int8", component=comp)
        typed = root / f"{comp}.qdq-fp16.onnx"
        info = qdq_on_variant(qdq, onnx_dir / f"{comp}.onnx", onnx_dir / f"{comp}.fp16.onnx", typed, "fp16")
        out[comp] = (typed, info, quantized["kept_high_precision"])
    return out


def _layers(onnx_dir, comp: str, kept: list[str]) -> tuple[list[str], list[str]]:
    """(the layers the Q/DQ graph quantized, those it kept in float): the recipe's, less what the decoder's
    measured sensitivity kept too."""
    quantize, keep = quantizable_nodes(onnx_dir / f"{comp}.onnx", comp)
    return [n for n in quantize if n not in set(kept)], keep + [n for n in quantize if n in set(kept)]


@pytest.mark.parametrize("comp", list(MIN_COSINE))
def test_int8_pairs_on_the_fp16_variant_stay_close_to_fp32(onnx_dir, feeds, fp16_qdq, comp):
    import onnxruntime as ort

    typed, info, kept = fp16_qdq[comp]
    quantize, _ = _layers(onnx_dir, comp, kept)
    assert info == {"qdq_base": "fp16", "qdq_layers": len(quantize)} and quantize
    runs = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for name, path in (("fp32", onnx_dir / f"{comp}.onnx"), ("int8", typed))}
    for f in feeds[1][comp][:2]:  # held out: another prompt, another size
        a, b = (s.run(None, f)[0].astype(np.float64) for s in runs.values())
        assert MIN_COSINE[comp] <= cosine(a, b) < 1.0  # < 1: the int8 layers really ran


@pytest.mark.parametrize("comp", list(MIN_COSINE))
def test_quantized_layers_read_16bit_qdq_and_the_rest_stays_16bit(onnx_dir, fp16_qdq, comp):
    typed, _, kept = fp16_qdq[comp]
    model = onnx.load(str(typed))
    fp32 = onnx.load(str(onnx_dir / f"{comp}.onnx"), load_external_data=False)
    quantize, keep = _layers(onnx_dir, comp, kept)
    pairs = {a.name: b.name for a, b in pair_layers(fp32, onnx.load(str(onnx_dir / f"{comp}.fp16.onnx")))}
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for name in quantize:
        node = nodes[pairs[name]]
        w, x = producer[node.input[1]], producer[node.input[0]]
        assert w.op_type == x.op_type == "DequantizeLinear"
        assert inits[w.input[0]].data_type == onnx.TensorProto.INT8 and inits[w.input[1]].data_type == FP16
        assert producer[x.input[0]].op_type == "QuantizeLinear" and inits[x.input[1]].data_type == FP16
    for name in keep:  # kept in higher precision: the variant's own 16-bit weight
        assert inits[nodes[pairs[name]].input[1]].data_type == FP16
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {QDQ_MIN_OPSET}
    assert lint(model) == []  # every op and input dtype is in TensorRT 11.1's table


def test_graphs_of_different_models_are_refused(onnx_dir, fp16_qdq, tmp_path):
    with pytest.raises(ModelLoadError, match="not exports of the same model|no counterpart"):
        qdq_on_variant(fp16_qdq["transformer"][0], onnx_dir / "transformer.onnx", onnx_dir / "vae_decoder.fp16.onnx",
                       tmp_path / "x.onnx", "fp16")
    assert list(tmp_path.iterdir()) == []


T4 = {"kind": "gpu", "name": "Tesla T4", "compute_capability": "7.5"}
H100 = {"kind": "gpu", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _fake_tensorrt(monkeypatch, gpu, built: dict):
    """TensorRT 11.4 on `gpu`; build_component records the graph it was given instead of building."""
    monkeypatch.setattr(trt_build, "build_target", lambda requested=None: dict(gpu))
    monkeypatch.setattr(trt_build, "library_versions", lambda: {"tensorrt": "11.4.0"})

    def build_component(source, out, component, precision, shapes, target, versions, compiled_cache=True):
        model = onnx.load(str(source))
        built[component] = {i.data_type for i in model.graph.initializer}, [n.op_type for n in model.graph.node]
        out.write_bytes(b"plan")
        return trt_build.BuildResult(info={"execution_provider": "TensorRT", "strongly_typed": True})

    monkeypatch.setattr(trt_build, "build_component", build_component)


def test_tensorrt_int8_builds_start_from_the_16bit_variant(onnx_dir, feeds, tmp_path, monkeypatch):
    built: dict = {}
    _fake_tensorrt(monkeypatch, T4, built)  # before Ampere: the 16-bit base is fp16
    calibration = {c: ("2 prompts", feeds[0][c]) for c in MIN_COSINE}
    out = build_engines(onnx_dir, tmp_path / "trt", backend="tensorrt", components=list(MIN_COSINE),
                        precision="transformer=int8,vae_decoder=int8", calibration=calibration)
    manifest = json.loads((out / "manifest.json").read_text())
    for comp in MIN_COSINE:
        dtypes, ops = built[comp]
        assert FP16 in dtypes and onnx.TensorProto.INT8 in dtypes and "QuantizeLinear" in ops
        entry = manifest["components"][comp]
        assert entry["precision"] == "int8" and entry["qdq_base"] == "fp16"
        assert entry["source_onnx"]["file"] == f"{comp}.fp16.onnx"
    assert sorted(p.name for p in out.iterdir() if "qdq" in p.name) == []  # the temporary Q/DQ graphs are gone


def test_tensorrt_int8_on_hopper_needs_the_bf16_variant(onnx_dir, feeds, tmp_path, monkeypatch):
    _fake_tensorrt(monkeypatch, H100, {})
    with pytest.raises(ModelLoadError, match="no bf16 variant of transformer.*int8 on a bf16 base.*--dtypes fp32,bf16"):
        build_engines(onnx_dir, tmp_path / "trt", backend="tensorrt", components=["transformer"],
                      precision="transformer=int8", calibration={"transformer": ("2 prompts", feeds[0]["transformer"])})
    assert not (tmp_path / "trt").exists()
