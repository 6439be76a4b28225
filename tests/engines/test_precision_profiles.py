"""Precision policy and shape profiles, both derived from the component specs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sprintrt.engines.precision import Precision, resolve_precisions
from sprintrt.engines.profiles import ProfileOptions, bin_latent_range, input_shapes, tensorrt_profile
from sprintrt.errors import InvalidInputError
from sprintrt import specs as S
from sprintrt.bins import TABLES

MODEL = S.ModelDims(vocab_size=1024, text_hidden=2304, latent_channels=32, vae_scale_factor=32, text_len_max=624,
                    text_layers=26, text_kv_heads=4, text_head_dim=256,
                    chi_tokens=114)


def test_tensorrt_defaults_are_the_safe_ones():
    assert resolve_precisions(None, "tensorrt") == {"text_encoder": Precision.BF16, "transformer": Precision.BF16,
                                                    "vae_decoder": Precision.BF16, "vae_encoder": Precision.BF16,
                                                    "controlnet": Precision.BF16,
                                                    "controlled_transformer": Precision.BF16}
    assert set(resolve_precisions(None, "onnxruntime").values()) == {Precision.FP32}


def test_per_component_overrides_keep_other_defaults():
    got = resolve_precisions("transformer=fp16, vae_decoder=fp32", "tensorrt")
    assert got == {"text_encoder": Precision.BF16, "transformer": Precision.FP16, "vae_decoder": Precision.FP32,
                   "vae_encoder": Precision.BF16, "controlnet": Precision.BF16, "controlled_transformer": Precision.BF16}
    assert resolve_precisions({"transformer": "tf32"}, "tensorrt")["transformer"] == Precision.TF32
    assert set(resolve_precisions("fp32", "tensorrt").values()) == {Precision.FP32}


@pytest.mark.parametrize("value,match", [
    ("fp16", "text_encoder.*Gemma2 overflows fp16"),
    ("unet=fp16", "component 'unet'"),
    ("transformer=int3", "precision='int3'"),
    ("fp8", "precision='fp8' is not available for text_encoder"),
])
def test_bad_precisions(value, match):
    with pytest.raises(InvalidInputError, match=match):
        resolve_precisions(value, "tensorrt")


@pytest.mark.parametrize("table", ["1024", "512"])
def test_every_bin_fits_the_dynamic_profile(table):
    bins = TABLES[table]
    for name in ("transformer", "vae_decoder", "vae_encoder"):
        prof = tensorrt_profile(S.SPEC_BUILDERS[name](MODEL), MODEL, ProfileOptions())
        for h, w in bins.values():
            assert prof["latent_height"]["min"] <= h // 32 <= prof["latent_height"]["max"], (name, h, w)
            assert prof["latent_width"]["min"] <= w // 32 <= prof["latent_width"]["max"], (name, h, w)
        assert prof["latent_height"]["opt"] == prof["latent_width"]["opt"] == 32  # 1024 px
        assert prof["batch"] == {"min": 1, "opt": 1, "max": 4}
    assert bin_latent_range(MODEL) == (8, 64)
    assert bin_latent_range(MODEL, ("1024",)) == (16, 64)


def test_vae_encoder_profile_takes_pixels_of_every_bin():
    spec = S.vae_encoder_spec(MODEL)
    shapes = input_shapes(spec, tensorrt_profile(spec, MODEL, ProfileOptions()))["sample"]
    assert shapes == {"min": (1, 3, 256, 256), "opt": (1, 3, 1024, 1024), "max": (4, 3, 2048, 2048)}
    feeds = spec.sample_inputs(spec.sizes("sample"))
    assert feeds["sample"].shape == (2, 3, 5 * 32, 4 * 32) and -1 <= feeds["sample"].min() < feeds["sample"].max() <= 1
    with pytest.raises(InvalidInputError, match="axis 2 is 161, expected a multiple of 32"):
        spec.check_feeds({"sample": np.zeros((1, 3, 161, 128), np.float32)})


def test_text_lengths_follow_the_pipeline_padding(tiny_checkpoint):
    """The transformer's text length is exactly what the runtime tokenizer pads to; the text encoder's
    reaches it and goes down to one token (the pipeline trims the padding before the encoder)."""
    from sprintrt.defaults import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
    from sprintrt.runtime.prompt import PromptTokenizer

    tok = PromptTokenizer(tiny_checkpoint / "tokenizer")
    chi = "\n".join(DEFAULT_COMPLEX_HUMAN_INSTRUCTION)
    model = dataclasses.replace(MODEL, chi_tokens=tok.count(chi))
    for with_chi, n in ((True, 300), (False, 300), (True, 120)):
        opts = ProfileOptions(max_sequence_length=n, complex_human_instruction=with_chi)
        te = tensorrt_profile(S.text_encoder_spec(model), model, opts)["text_len"]
        assert te["min"] == 1 and te["max"] == tok.text_length(n, chi if with_chi else None)
        assert te["min"] <= te["opt"] <= te["max"]
        tr = tensorrt_profile(S.transformer_spec(model), model, opts)["text_seq"]
        assert tr["min"] == tr["max"] == n


def test_static_profile_and_input_shapes():
    spec = S.transformer_spec(MODEL)
    prof = tensorrt_profile(spec, MODEL, ProfileOptions(static=(1, 1024, 768)))
    shapes = input_shapes(spec, prof)
    assert shapes["hidden_states"] == {"min": (1, 32, 32, 24), "opt": (1, 32, 32, 24), "max": (1, 32, 32, 24)}
    assert shapes["encoder_hidden_states"]["max"] == (1, 300, 2304)
    with pytest.raises(InvalidInputError, match="static"):
        tensorrt_profile(spec, MODEL, ProfileOptions(static=(1, 1000, 768)))
    with pytest.raises(InvalidInputError, match="max_batch=9"):
        tensorrt_profile(spec, MODEL, ProfileOptions(max_batch=9))


def test_quantized_precisions_quantize_every_component_with_a_recipe():
    from sprintrt.engines.precision import quantized_precisions

    ort = quantized_precisions("int8", "onnxruntime")
    assert ort == {"text_encoder": Precision.INT8, "transformer": Precision.INT8, "vae_decoder": Precision.INT8,
                   "vae_encoder": Precision.INT8,
                   "controlnet": Precision.INT8, "controlled_transformer": Precision.INT8}
    assert quantized_precisions("fp8", "tensorrt")["transformer"] == Precision.FP8
    assert quantized_precisions("fp8", "tensorrt")["controlnet"] == Precision.FP8
    assert quantized_precisions("fp8", "tensorrt")["vae_decoder"] == Precision.BF16
    assert quantized_precisions("vae_decoder=int8", "ov")["vae_decoder"] == Precision.INT8
    with pytest.raises(InvalidInputError, match="no component is quantized to fp8"):
        quantized_precisions("fp8", "onnxruntime")
    with pytest.raises(InvalidInputError, match="quantizes no component"):
        quantized_precisions("transformer=fp32", "onnxruntime")
    with pytest.raises(InvalidInputError, match="'fp8' is not available for vae_encoder"):
        quantized_precisions("vae_encoder=fp8", "tensorrt")
