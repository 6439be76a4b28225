"""Typed 16-bit variants: exported beside each fp32 graph, fp32 islands kept, validated on the CPU
(fp16 in ONNX Runtime, bf16 in OpenVINO), built into engines, and images close to diffusers fp32."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sprintrt.errors import ExportValidationError, InvalidInputError, ModelLoadError
from sprintrt.export import typed
from sprintrt.metrics import cosine, psnr

# Measured on the tiny checkpoint: images of an fp16 transformer + fp16 VAE decoder pipeline (ONNX
# Runtime) against diffusers fp32: 69.4-73.9 dB (2-vCPU AMD EPYC); a dropped island gives NaN, a wrong graph < 20 dB.
FP16_PSNR_DB = 40.0


def test_dtype_policy():
    assert typed.parse_dtypes("bf16, fp16") == ("fp32", "bf16", "fp16")
    assert typed.variant_dtypes("text_encoder", ("fp32", "bf16", "fp16")) == ("bf16",)  # Gemma2 overflows fp16
    assert typed.variant_dtypes("transformer", ("fp32", "fp16")) == ("fp16",)
    with pytest.raises(InvalidInputError, match="dtypes='fp8'"):
        typed.parse_dtypes("fp8")


@pytest.mark.parametrize("component", ["transformer", "vae_decoder", "vae_encoder"])
def test_fp16_variants_are_recorded_and_validated(onnx_dir, component):
    from sprintrt.files import file_mismatch

    record = json.loads((onnx_dir / "export_info.json").read_text())["components"][component]
    v = record["variants"]["fp16"]
    assert v["file"] == f"{component}.fp16.onnx" and file_mismatch(onnx_dir / v["file"], v["bytes"], v["sha256"]) is None
    assert len(v["validation"]) >= 2 and all(r["cosine"] >= typed.RULES[component].min_cosine["fp16"]
                                            for r in v["validation"])
    assert v["fp32"]["island_nodes"] > 0 and v["trt_lint"] == []
    model = onnx.load(str(onnx_dir / v["file"]))
    inits = [i for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT16, TensorProto.FLOAT)]
    assert any(i.data_type == TensorProto.FLOAT16 for i in inits)  # weights stored in 16 bits
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [TensorProto.FLOAT]  # fp32 I/O
    types = typed._elem_types(model)
    for n in model.graph.node:
        if n.op_type in ("ReduceMean", "Resize"):  # RMSNorm variances, DC-AE upsampling: fp32 islands
            assert types[n.output[0]] == TensorProto.FLOAT, n.name


def test_fp16_transformer_keeps_the_linear_attention_in_fp32(onnx_dir):
    model = onnx.load(str(onnx_dir / "transformer.fp16.onnx"))
    types = typed._elem_types(model)
    by_name = {n.name: n for n in model.graph.node}
    nodes = typed.linear_attention_nodes(model)
    ops = [by_name[n].op_type for n in nodes]
    blocks = 2
    assert ops.count("Div") == blocks and ops.count("MatMul") == 2 * blocks
    assert all(types[by_name[n].output[0]] == TensorProto.FLOAT for n in nodes)  # no fp16 on the normaliser path


def _normaliser_graph(dtype: int) -> onnx.ModelProto:
    """num / (den + 1e-15), as SANA's linear attention normalises, computed in `dtype`."""
    eps = helper.make_tensor("eps", dtype, [], [1e-15] if dtype == TensorProto.FLOAT else [np.float16(1e-15)])
    graph = helper.make_graph(
        [helper.make_node("Add", ["den", "eps"], ["d"]), helper.make_node("Div", ["num", "d"], ["out"])], "norm",
        [helper.make_tensor_value_info("num", dtype, [4]), helper.make_tensor_value_info("den", dtype, [4])],
        [helper.make_tensor_value_info("out", dtype, [4])], [eps])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_without_its_fp32_island_the_linear_attention_gives_nan():
    """An all-zero key column makes num = den = 0: the fp32 epsilon keeps 0/1e-15 = 0; in fp16 the
    epsilon flushes to 0 and the division is NaN. The hazard the islands exist for."""
    import onnxruntime as ort

    zeros = np.zeros(4)
    out = {}
    for name, dtype, np_dtype in (("fp32", TensorProto.FLOAT, np.float32), ("fp16", TensorProto.FLOAT16, np.float16)):
        sess = ort.InferenceSession(_normaliser_graph(dtype).SerializeToString(), providers=["CPUExecutionProvider"])
        out[name] = sess.run(None, {"num": zeros.astype(np_dtype), "den": zeros.astype(np_dtype)})[0]
    assert np.all(out["fp32"] == 0) and np.all(np.isnan(out["fp16"]))


def test_a_dropped_island_fails_the_export_check_and_casts_restore_it():
    """A Softmax computing in fp16 (as the exporter wrote Gemma2's softmax(dtype=float32)) is refused;
    enforce_islands wraps it in Casts so it computes in fp32."""
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=-1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    with pytest.raises(ExportValidationError, match="must stay fp32.*sm"):
        typed.check_islands(model, "text_encoder", "bf16")
    assert typed.enforce_islands(model, "text_encoder") == 1
    assert typed.check_islands(model, "text_encoder", "bf16")["fp32_nodes_by_op"] == {"Cast": 1, "Softmax": 1}
    onnx.checker.check_model(model)


def test_fp16_engines_build_from_the_variants_and_stay_close_to_diffusers(onnx_dir, reference_pipe, tmp_path):
    from sprintrt.engines.build import build_engines
    from sprintrt.runtime.pipeline import SprintPipeline

    out = build_engines(onnx_dir, tmp_path / "fp16", precision="transformer=fp16,vae_decoder=fp16",
                        components=("text_encoder", "transformer", "vae_decoder"))
    entries = json.loads((out / "manifest.json").read_text())["components"]
    assert entries["transformer"]["source_onnx"]["file"] == "transformer.fp16.onnx"
    assert entries["text_encoder"]["source_onnx"]["file"] == "text_encoder.onnx"
    assert "__fp16__" in entries["vae_decoder"]["key"]
    pipe = SprintPipeline.from_engines(out)
    for steps in (1, 2):
        kw = dict(prompt="a tiger walking in tall grass", num_inference_steps=steps, height=256, width=192,
                  intermediate_timesteps=1.3 if steps == 2 else None, use_resolution_binning=False, output_type="np")
        ref = reference_pipe(**kw, generator=torch.Generator().manual_seed(3)).images
        ours = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
        assert np.isfinite(ours).all() and np.abs(ours - ref).max() > 0  # fp16 really ran
        assert psnr(ours, ref) >= FP16_PSNR_DB


def test_a_missing_variant_is_a_typed_error_before_any_work(onnx_dir, tmp_path):
    from sprintrt.engines.build import build_engines

    with pytest.raises(InvalidInputError, match="Gemma2 overflows fp16"):  # refused before any variant is looked for
        build_engines(onnx_dir, tmp_path / "e", precision="text_encoder=fp16")
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy)
    info = json.loads((copy / "export_info.json").read_text())
    info["components"]["transformer"]["variants"] = {}
    (copy / "export_info.json").write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match="no fp16 variant of transformer.*--dtypes fp32,fp16"):
        build_engines(copy, tmp_path / "e", precision="transformer=fp16")
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def bf16_dir(typed_onnx_dir):
    pytest.importorskip("openvino")
    return typed_onnx_dir


def test_bf16_variants_validate_in_openvino_and_keep_softmax_in_fp32(bf16_dir):
    info = json.loads((bf16_dir / "export_info.json").read_text())
    for component in ("text_encoder", "transformer"):
        v = info["components"][component]["variants"]["bf16"]
        assert all(r["cosine"] >= typed.RULES[component].min_cosine["bf16"] and r["finite"] for r in v["validation"])
        assert v["trt_lint"] == []
    te = info["components"]["text_encoder"]["variants"]["bf16"]
    assert te["fp32"]["fp32_nodes_by_op"]["Softmax"] == 2  # one per Gemma2 layer of the tiny model
    model = onnx.load(str(bf16_dir / "text_encoder.bf16.onnx"))
    assert any(i.data_type == TensorProto.BFLOAT16 for i in model.graph.initializer)


def test_openvino_bf16_builds_from_the_bf16_variant_with_half_the_weights(bf16_dir, tmp_path):
    """OpenVINO reads the bf16 variant where the export has one (bf16 weights: half the IR, less memory),
    and its text encoder stays as close to the fp32 engine as the bf16 hint on the fp32 graph does."""
    from sprintrt.engines.build import build_engines
    from sprintrt.manifest import read_manifest
    from sprintrt import specs as S
    from sprintrt.runtime.registry import load_engine
    from sprintrt.runtime.text_prefix import no_past

    comps = ("text_encoder",)
    dirs = {"ov-bf16": build_engines(bf16_dir, tmp_path / "b", backend="openvino", precision="bf16", components=comps),
            "ort-fp32": build_engines(bf16_dir, tmp_path / "r", backend="onnxruntime", precision="fp32",
                                      components=comps),
            "ov-fp32": build_engines(bf16_dir, tmp_path / "f", backend="openvino", precision="fp32", components=comps)}
    manifests = {k: read_manifest(d) for k, d in dirs.items()}
    entry = manifests["ov-bf16"].components["text_encoder"]
    assert entry["source_onnx"]["file"] == "text_encoder.bf16.onnx"
    assert manifests["ov-fp32"].components["text_encoder"]["source_onnx"]["file"] == "text_encoder.onnx"
    bin_bytes = {k: m.components["text_encoder"]["extra_files"][0]["bytes"] for k, m in manifests.items() if "ov" in k}
    assert 0.4 < bin_bytes["ov-bf16"] / bin_bytes["ov-fp32"] < 0.6, bin_bytes
    ids = np.random.RandomState(0).randint(0, 200, size=(2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    past = no_past(S.ModelDims.from_json(manifests["ort-fp32"].data["model_dims"]), len(ids))
    ref, ours = (load_engine(manifests[k], "text_encoder")(input_ids=ids, attention_mask=mask, **past)
                 ["last_hidden_state"] for k in ("ort-fp32", "ov-bf16"))
    agreement = cosine(ours, ref)
    assert np.abs(ours - ref).max() > 0 and agreement > 0.999, agreement  # measured 0.99998 (tiny)


def test_an_fp16_engine_whose_optimised_graph_outgrows_protobuf_keeps_external_weights(onnx_dir, tmp_path,
                                                                                      monkeypatch):
    """ONNX Runtime's CPU optimiser folds an fp16 graph's weights into fp32 copies: the real fp16 transformer
    (1.19 GB) came out at 2.37 GB, over protobuf's 2 GB. The build plans for the doubling."""
    from sprintrt.engines import ort_build
    from sprintrt.engines.build import build_engines
    from sprintrt.manifest import read_manifest
    from sprintrt.runtime.registry import load_engine

    info = json.loads((onnx_dir / "export_info.json").read_text())
    fp16_bytes = info["components"]["transformer"]["variants"]["fp16"]["bytes"]
    monkeypatch.setattr(ort_build, "EXTERNAL_DATA_BYTES", int(fp16_bytes * 1.5))  # the limit, scaled to the tiny model
    out = build_engines(onnx_dir, tmp_path / "e", backend="onnxruntime", precision="transformer=fp16",
                        components=("transformer",))
    manifest = read_manifest(out)
    entry = manifest.components["transformer"]
    assert [f["file"] for f in entry["extra_files"]] == [entry["file"] + ".data"]
    load_engine(manifest, "transformer").release()  # the saved graph finds its weights


def test_openvino_int8w_compresses_the_bf16_variant_only_on_cpus_with_bf16(bf16_dir, onnx_dir, monkeypatch):
    """int8w computes in bf16 where the CPU has it, so it compresses the bf16 variant's weights there (half
    the bytes to read); elsewhere it computes in fp32 from the fp32 graph; an export without the bf16 variant
    falls back to the fp32 graph."""
    from sprintrt.engines import ov_build
    from sprintrt.engines.build import plan_build

    bf16_cpu = {"kind": "cpu", "arch": "x86_64", "name": "Zen 5", "isa": ["avx2", "avx512_bf16"]}
    avx2_cpu = {"kind": "cpu", "arch": "x86_64", "name": "Zen 3", "isa": ["avx2", "fma"]}

    def source(onnx, target):
        monkeypatch.setattr(ov_build, "build_target", lambda requested=None: target)
        (plan,) = plan_build(onnx, bf16_dir.parent / "unused", backend="openvino", precision="transformer=int8w",
                             components=("transformer",)).components
        return plan.source_dtype, plan.source.name, ov_build.hint(plan.precision, target)

    assert source(bf16_dir, bf16_cpu) == ("bf16", "transformer.bf16.onnx", "bf16")
    assert source(bf16_dir, avx2_cpu) == ("fp32", "transformer.onnx", "f32")
    assert source(onnx_dir, bf16_cpu) == ("fp32", "transformer.onnx", "bf16")  # no bf16 variant exported
