"""Component specs: every derived view comes from the one declaration."""

from __future__ import annotations

import numpy as np
import pytest

from sprintrt.errors import InvalidInputError
from sprintrt import specs as S

DIMS = S.ModelDims(vocab_size=1024, text_hidden=32, latent_channels=32, vae_scale_factor=32, text_len_max=624, text_layers=2, text_kv_heads=1, text_head_dim=16, controlnet_blocks=1, transformer_hidden=16)


@pytest.mark.parametrize("name", S.COMPONENTS)
def test_validation_sizes_never_equal_trace_sizes(name):
    spec = S.SPEC_BUILDERS[name](DIMS)
    sample = spec.sizes("sample")
    sizes = spec.validation_sizes()
    assert len(sizes) >= 2
    for s in sizes:
        assert all(s[d] != sample[d] for d in s), s
        assert all(spec.dims()[d].min <= v <= spec.dims()[d].max for d, v in s.items())


def test_sample_inputs_follow_the_spec():
    spec = S.transformer_spec(DIMS)
    feeds = spec.sample_inputs({"batch": 3, "latent_height": 5, "latent_width": 7, "text_seq": 11})
    assert feeds["hidden_states"].shape == (3, 32, 5, 7) and feeds["hidden_states"].dtype == np.float32
    mask = feeds["encoder_attention_mask"]
    assert mask.dtype == np.int64 and (mask[:, 0] == 1).all()
    assert all((np.diff(row) <= 0).all() for row in mask)  # right padding
    spec.check_feeds(feeds)


def test_output_shapes_scale_with_the_vae_factor():
    spec = S.vae_decoder_spec(DIMS)
    assert spec.output_shapes({"batch": 2, "latent_height": 4, "latent_width": 6})["sample"] == (2, 3, 128, 192)


@pytest.mark.parametrize("change,match", [
    (lambda f: f.pop("timestep"), "'timestep' is missing"),
    (lambda f: f.__setitem__("timestep", f["timestep"].astype(np.float64)), "dtype float64"),
    (lambda f: f.__setitem__("hidden_states", np.zeros((2, 32, 200, 6), np.float32)), "latent_height.*200.*\\[1, 128\\]"),
    (lambda f: f.__setitem__("guidance", np.zeros((3,), np.float32)), "batch is 2 in one input and 3"),
    (lambda f: f.__setitem__("hidden_states", np.zeros((2, 16, 8, 6), np.float32)), "axis 1 is 16, expected 32"),
])
def test_check_feeds_names_tensor_and_range(change, match):
    spec = S.transformer_spec(DIMS)
    feeds = spec.sample_inputs(spec.sizes())
    change(feeds)
    with pytest.raises(InvalidInputError, match=match):
        spec.check_feeds(feeds)


def test_bad_dim_declarations_are_rejected():
    with pytest.raises(ValueError):
        S.Dim("x", 1, 1, 8, sample=2, probes=(2, 3))  # a probe equal to the trace size
    with pytest.raises(ValueError):
        S.Dim("x", 4, 2, 8, sample=5, probes=(6,))  # opt below min
