"""The opt-in prompt-embedding cache: same images as diffusers, the encoder runs only for new prompts,
bounded LRU eviction, no sharing across encoders, typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sprintrt.errors import InvalidInputError
from sprintrt.runtime.prompt_cache import PromptEmbeddingCache
from sprintrt.metrics import PARITY_MAX_ABS

TOL = PARITY_MAX_ABS  # max |diff| vs diffusers, images in [0, 1] (sprintrt/metrics.py)


def test_cached_prompts_skip_the_encoder_and_keep_diffusers_images(reference_pipe, sprint_pipe, monkeypatch,
                                                                  engine_spy):
    recorder = engine_spy(sprint_pipe.text_encoder, "input_ids")
    cache = PromptEmbeddingCache(8)
    monkeypatch.setattr(sprint_pipe, "text_encoder", recorder)
    monkeypatch.setattr(sprint_pipe, "prompt_cache", cache)
    kw = dict(num_inference_steps=1, intermediate_timesteps=None, height=128, width=128, use_resolution_binning=False,
              output_type="np")
    for prompts in (["a koi pond", "an owl under a full moon"], ["an owl under a full moon", "a red barn"],
                    ["a red barn", "a koi pond"]):
        ours = sprint_pipe(prompts, generator=torch.Generator().manual_seed(7), **kw).images
        ref = reference_pipe(prompts, generator=torch.Generator().manual_seed(7), **kw).images
        assert np.abs(ours - ref).max() <= TOL
    assert [s[0] for s in recorder.shapes] == [2, 1]  # the third call is all hits
    assert (cache.hits, cache.misses, len(cache)) == (3, 3, 3)


def test_lru_eviction_and_read_only_values():
    cache = PromptEmbeddingCache(2)
    ids = [np.array([2, i, 0], dtype=np.int64) for i in range(3)]
    mask = np.array([1, 1, 0], dtype=np.int64)
    keys = [cache.key("enc", i, mask) for i in ids]
    cache.put(keys[0], np.zeros((2, 4)))
    cache.put(keys[1], np.ones((2, 4)))
    assert cache.get(keys[0]) is not None  # 0 is now the most recent
    cache.put(keys[2], np.ones((2, 4)))  # evicts 1, the least recent
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and len(cache) == 2
    with pytest.raises(ValueError):
        cache.get(keys[0])[0, 0] = 5.0


def test_entries_are_not_shared_across_encoders_or_masks():
    cache = PromptEmbeddingCache(4)
    ids, mask = np.array([2, 7, 9], dtype=np.int64), np.array([1, 1, 1], dtype=np.int64)
    cache.put(cache.key("encoder-A", ids, mask), np.ones((3, 4)))
    assert cache.get(cache.key("encoder-B", ids, mask)) is None
    assert cache.get(cache.key("encoder-A", ids, np.array([1, 1, 0], dtype=np.int64))) is None
    assert cache.get(cache.key("encoder-A", ids, mask)) is not None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_cache_size_is_a_typed_error(bad):
    with pytest.raises(InvalidInputError, match="max_entries"):
        PromptEmbeddingCache(bad)


def test_from_engines_takes_a_size(engine_dir):
    from sprintrt.runtime.pipeline import SprintPipeline

    pipe = SprintPipeline.from_engines(engine_dir, components=("text_encoder", "transformer"), prompt_cache=3)
    assert isinstance(pipe.prompt_cache, PromptEmbeddingCache) and pipe.prompt_cache.max_entries == 3
    a = pipe.encode_prompt("a koi pond")[0]
    b = pipe.encode_prompt("a koi pond")[0]
    assert pipe.prompt_cache.hits == 1 and np.array_equal(a, b)
