"""Each exported ONNX graph matches the real diffusers/transformers module at shapes other than the trace shape."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sprintrt.errors import ExportValidationError, InvalidInputError
from sprintrt import specs as S
from sprintrt.export_info import EXPORT_INFO
from sprintrt.defaults import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from sprintrt.export.checkpoint import load_component
from sprintrt.export.onnx_export import export_model, model_facts, wrapper_for
from sprintrt.export.validate import FP32, validate_onnx


def _spec(checkpoint, name):
    return S.SPEC_BUILDERS[name](model_facts(checkpoint)[0])


@pytest.mark.parametrize("name", S.COMPONENTS)
def test_export_validation_records(onnx_dir, name):
    info = json.loads((onnx_dir / "export_info.json").read_text())
    rec = info["components"][name]
    sample = {n: d["sample"] for n, d in rec["spec"]["dims"].items()}
    assert len(rec["validation"]) >= 2
    for r in rec["validation"]:
        assert all(r["sizes"][d] != sample[d] for d in sample)
        assert r["finite"] and r["cosine"] >= FP32.min_cosine
        assert r["max_abs"] <= FP32.atol + FP32.rtol * r["ref_max_abs"]


def _ort(onnx_dir, name):
    return ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def test_text_encoder_matches_gemma2(onnx_dir, reference_pipe):
    """Against Gemma2Model itself, on real tokenized prompts of two batch sizes and lengths: one run without a
    past, and the same tokens split in two runs (the first's present_key_values as the second's past). Over the
    real tokens: a padded position whose every key is masked (left padding) averages over the past's masked
    placeholder slot too; nothing reads those positions."""
    from sprintrt.runtime.text_prefix import no_past

    dims = S.ModelDims.from_json(json.loads((onnx_dir / EXPORT_INFO).read_text())["model_dims"])
    sess, tok = _ort(onnx_dir, "text_encoder"), reference_pipe.tokenizer
    for prompts, length, split in ((["a cat"], 9, 2), (["a red fox in snow", "a lighthouse", "x"], 23, 4)):
        enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        with torch.no_grad():
            ref = reference_pipe.text_encoder(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
        real, bound = mask.astype(bool), FP32.atol * max(1.0, np.abs(ref).max())
        out = sess.run(None, {"input_ids": ids, "attention_mask": mask, **no_past(dims, len(ids))})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref)[real].max() <= bound
        head, present = sess.run(None, {"input_ids": ids[:, :split], "attention_mask": mask[:, :split],
                                        **no_past(dims, len(ids))})
        tail = sess.run(None, {"input_ids": ids[:, split:], "attention_mask": mask[:, split:],
                               "past_key_values": present, "past_attention_mask": mask[:, :split]})[0]
        assert np.abs(np.concatenate([head, tail], 1) - ref)[real].max() <= bound


def test_transformer_matches_diffusers_with_its_own_attention(onnx_dir, reference_pipe, tiny_checkpoint):
    """Against SanaTransformer2DModel with diffusers' own processors (not our export processor)."""
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel.from_config(reference_pipe.transformer.config).eval()
    model.load_state_dict(reference_pipe.transformer.state_dict())
    spec = _spec(tiny_checkpoint, "transformer")
    for sizes in ({"batch": 1, "latent_height": 7, "latent_width": 3, "text_seq": 19},
                  {"batch": 4, "latent_height": 4, "latent_width": 10, "text_seq": 300}):
        feeds = spec.sample_inputs(sizes, seed=3)
        out = _ort(onnx_dir, "transformer").run(None, feeds)[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(feeds["hidden_states"]),
                        encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"]),
                        encoder_attention_mask=torch.from_numpy(feeds["encoder_attention_mask"]),
                        timestep=torch.from_numpy(feeds["timestep"]), guidance=torch.from_numpy(feeds["guidance"]),
                        return_dict=False)[0].numpy()
        assert np.abs(out - ref).max() <= FP32.atol * max(1.0, np.abs(ref).max())


def test_vae_decoder_matches_autoencoder_dc(onnx_dir, reference_pipe):
    for shape in ((1, 32, 4, 9), (2, 32, 6, 4)):
        z = np.random.default_rng(shape[2]).standard_normal(shape).astype(np.float32)
        out = _ort(onnx_dir, "vae_decoder").run(None, {"latent": z})[0]
        with torch.no_grad():
            ref = reference_pipe.vae.decode(torch.from_numpy(z), return_dict=False)[0].numpy()
        assert out.shape == (shape[0], 3, shape[2] * 32, shape[3] * 32) == ref.shape
        assert np.abs(out - ref).max() <= FP32.atol * max(1.0, np.abs(ref).max())


def test_validation_fails_loudly_on_a_wrong_graph(onnx_dir, tiny_checkpoint):
    module = wrapper_for("vae_decoder", load_component(tiny_checkpoint, "vae_decoder"))  # wrappers rewrite in place
    spec = _spec(tiny_checkpoint, "vae_decoder")

    class Shifted(torch.nn.Module):  # what a subtly broken export would compute
        def forward(self, latent):
            return (module(latent)[0] + 1e-3,)

    validate_onnx(onnx_dir / "vae_decoder.onnx", module, spec)  # the real graph passes
    with pytest.raises(ExportValidationError, match="vae_decoder.*disagrees"):
        validate_onnx(onnx_dir / "vae_decoder.onnx", Shifted(), spec)


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import sprintrt.export.validate as V

    def broken(*a, **k):
        raise ExportValidationError("planted")

    monkeypatch.setattr(V, "validate_onnx", broken)
    out = tmp_path / "onnx"
    with pytest.raises(ExportValidationError, match="planted"):
        export_model(tiny_checkpoint, out, components=("transformer",), dtypes=("fp32",))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_foreign_directory_and_bad_components(tiny_checkpoint, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="not an sprintrt ONNX directory"):
        export_model(tiny_checkpoint, tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(InvalidInputError, match="components="):
        export_model(tiny_checkpoint, tmp_path / "x", components=("unet",))


def test_model_facts_agree_with_the_loaded_pipeline(tiny_checkpoint, reference_pipe):
    dims, constants = model_facts(tiny_checkpoint)
    assert dims.vae_scale_factor == reference_pipe.vae_scale_factor
    assert dims.text_hidden == reference_pipe.text_encoder.config.hidden_size
    assert dims.chi_tokens == len(reference_pipe.tokenizer.encode("\n".join(DEFAULT_COMPLEX_HUMAN_INSTRUCTION)))
    assert constants.vae_scaling_factor == reference_pipe.vae.config.scaling_factor
    assert constants.sigma_data == reference_pipe.scheduler.config.sigma_data
    assert constants.guidance_embeds_scale == reference_pipe.transformer.config.guidance_embeds_scale


def test_large_model_path_streams_weights_to_external_data(tiny_checkpoint, onnx_dir, tmp_path, monkeypatch):
    """Models over 2 GB (Gemma2-2B, the 0.6B and 1.6B transformers) take the streaming path; force it on
    the tiny text encoder and transformer and check the result is as valid as the in-memory path's, with
    the same weight layers visible to the int8 recipes (before the weights' Transposes were folded, the
    real models' linear layers were all hidden behind them)."""
    import onnx

    import sprintrt.export.onnx_export as E  # noqa: F401 (its `files` module holds the threshold)
    from sprintrt.engines.quantize import quantizable_nodes
    from sprintrt.export.trt_lint import lint

    monkeypatch.setattr(E.files, "EXTERNAL_DATA_BYTES", 0)
    out = export_model(tiny_checkpoint, tmp_path / "onnx", components=("text_encoder", "transformer"))
    info = json.loads((out / "export_info.json").read_text())["components"]
    for comp in ("text_encoder", "transformer"):
        graph = onnx.load(str(out / f"{comp}.onnx"), load_external_data=False)
        weights = {i.name for i in graph.graph.initializer}
        assert not [n.name for n in graph.graph.node if n.op_type == "Transpose" and n.input[0] in weights]
        assert len(quantizable_nodes(graph, comp)[0]) == len(quantizable_nodes(onnx_dir / f"{comp}.onnx", comp)[0]) > 0
        assert all(r["cosine"] >= FP32.min_cosine for r in info[comp]["validation"])  # the folded weights are right
    rec = info["transformer"]
    assert rec["external_data"]["file"] == "transformer.onnx.data" and (out / "transformer.onnx.data").is_file()
    assert len(rec["validation"]) >= 2 and all(r["cosine"] >= FP32.min_cosine for r in rec["validation"])
    assert rec["trt_lint"] == [] and lint(out / "transformer.onnx") == []
    # The bf16 variant streams too, and its islands are enforced without loading the external weights.
    v = rec["variants"]["bf16"]
    assert v["external_data"]["file"] == "transformer.bf16.onnx.data" and v["trt_lint"] == []
    assert all(r["finite"] and r["cosine"] >= 0.99 for r in v["validation"])


def test_channels_first_rms_norm_equals_diffusers_and_leaves_no_transpose_pairs(onnx_dir, tiny_checkpoint,
                                                                              monkeypatch):
    """The VAE export normalises NCHW tensors on axis 1 (same numbers as diffusers' RMSNorm on the
    channels-last view, within 1e-6 relative) and its graph has no Transpose feeding its own inverse."""
    import onnx
    from diffusers.models.normalization import RMSNorm

    from sprintrt.export.wrappers import ChannelsFirstRMSNorm

    norm = RMSNorm(24, 1e-5, elementwise_affine=True, bias=True)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        x = torch.randn(2, 5, 7, 24) * 3
        ref, ours = norm(x), ChannelsFirstRMSNorm(norm)(x)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())

    graph = onnx.load(onnx_dir / "vae_decoder.onnx").graph
    producer = {o: n for n in graph.node for o in n.output}
    pairs = [n.name for n in graph.node if n.op_type == "Transpose" and producer.get(n.input[0]) is not None
             and producer[n.input[0]].op_type == "Transpose"]
    assert pairs == []
    # Without the rewrite every norm costs at least one Transpose more (2, or 1 where it follows another).
    import sprintrt.export.wrappers as W
    from sprintrt.export.onnx_export import trace_to_onnx

    vae = load_component(tiny_checkpoint, "vae_decoder")
    n_norms = sum(isinstance(m, RMSNorm) for m in vae.decoder.modules())
    monkeypatch.setattr(W, "channels_first_rms_norms", lambda module: 0)
    plain = trace_to_onnx(wrapper_for("vae_decoder", vae), _spec(tiny_checkpoint, "vae_decoder")).graph
    count = lambda g: sum(n.op_type == "Transpose" for n in g.node)  # noqa: E731
    assert n_norms >= 4 and count(plain) - count(graph) >= n_norms


@pytest.mark.parametrize("in_channels,out_channels,shortcut", [(8, 4, True), (6, 3, True), (16, 16, True), (5, 3, False)])
def test_sub_pixel_upsampling_equals_diffusers_up_block(in_channels, out_channels, shortcut):
    """DCUpBlock2d(interpolate=True) rewritten as one 2x2 conv + pixel_shuffle + crop gives diffusers' numbers
    (max|Δ| ≤ 1e-5·max|ref|) at odd, non-square sizes, with and without the shortcut, in fewer multiply-adds."""
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

    from sprintrt.export.wrappers import SubPixelUpBlock

    torch.manual_seed(in_channels)
    block = DCUpBlock2d(in_channels, out_channels, interpolate=True, shortcut=shortcut).eval()
    with torch.no_grad():
        block.conv.bias.normal_()
        ours = SubPixelUpBlock(block)
        for size in ((4, 4), (5, 3), (1, 7)):
            x = torch.randn(2, in_channels, *size)
            ref, out = block(x), ours(x)
            assert out.shape == ref.shape == (2, out_channels, 2 * size[0], 2 * size[1])
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # 4 phases x 2x2 taps on the low-res grid vs 3x3 taps on the 4x larger one: 16/36 of the work.
    assert ours.conv.weight.numel() * 9 == block.conv.weight.numel() * 16


def test_vae_decoder_graph_has_no_resize_and_rewrites_every_interpolating_block(onnx_dir, tiny_checkpoint):
    """The exported decoder upsamples by sub-pixel convolutions only; the wrapper rewrote each block."""
    import onnx
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

    from sprintrt.export.wrappers import sub_pixel_upsampling

    graph = onnx.load(onnx_dir / "vae_decoder.onnx").graph
    ops = [n.op_type for n in graph.node]
    vae = load_component(tiny_checkpoint, "vae_decoder")
    n_blocks = sum(isinstance(m, DCUpBlock2d) and m.interpolate for m in vae.decoder.modules())
    assert n_blocks >= 2 and "Resize" not in ops and ops.count("DepthToSpace") == n_blocks
    assert sub_pixel_upsampling(vae.decoder) == n_blocks
    assert not any(isinstance(m, DCUpBlock2d) for m in vae.decoder.modules())
