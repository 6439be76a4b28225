"""The instruction prefix: computed once, reused by every prompt, the same hidden states as one full run
of transformers' Gemma2Model (tiny checkpoint; tolerance: 1e-4 of the largest value, fp32 reorderings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sprintrt import specs as S
from sprintrt.defaults import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from sprintrt.runtime.text_prefix import TextEncoderRunner, shared_length

CHI = "\n".join(DEFAULT_COMPLEX_HUMAN_INSTRUCTION)
TOL = 1e-4


def _gemma2(reference_pipe, ids, mask):
    with torch.no_grad():
        return reference_pipe.text_encoder(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()


def _close(ours, ref, mask):
    real = mask.astype(bool)
    return np.abs(ours[real] - ref[real]).max() <= TOL * np.abs(ref[real]).max()


def test_shared_length_counts_the_common_leading_tokens():
    prefix = np.array([2, 7, 8, 9])
    assert shared_length(prefix, np.array([[2, 7, 8, 9, 5], [2, 7, 8, 9, 6]])) == 4
    # The instruction's last token merged with the prompt's first in one row: only 3 are shared.
    assert shared_length(prefix, np.array([[2, 7, 8, 9, 5], [2, 7, 8, 11, 6]])) == 3
    assert shared_length(prefix, np.array([[2, 7]])) == 2
    assert shared_length(prefix, np.array([[3, 7, 8, 9]])) == 0


def test_prompts_reuse_the_instruction_and_match_one_full_gemma2_run(reference_pipe, sprint_pipe, monkeypatch,
                                                                     engine_spy):
    """After one run over the instruction alone, each call runs the encoder over the prompts' own tokens only,
    and its hidden states equal Gemma2Model's over all the tokens, wherever the mask is 1."""
    spy = engine_spy(sprint_pipe.text_encoder, "input_ids")
    sprint_pipe.set_engine("text_encoder", spy)  # a new engine: the cached prefix is dropped
    try:
        prompts = ["a koi pond", "a steaming cup of coffee next to an open notebook on a wooden desk"]
        ids, mask = sprint_pipe.tokenizer(prompts, 300, CHI)
        ours = sprint_pipe._encode_tokens(ids, mask, CHI)
        assert _close(ours, _gemma2(reference_pipe, ids, mask), mask)
        instruction = len(sprint_pipe.tokenizer.instruction_ids(CHI))
        shared = shared_length(sprint_pipe.tokenizer.instruction_ids(CHI), ids)
        longest = int(mask.sum(1).max())
        assert instruction - 1 <= shared <= instruction  # at most the boundary token differs
        assert spy.shapes == [(1, instruction), (2, longest - shared)]
        ids2, mask2 = sprint_pipe.tokenizer(["an owl"], 300, CHI)
        assert _close(sprint_pipe._encode_tokens(ids2, mask2, CHI), _gemma2(reference_pipe, ids2, mask2), mask2)
        assert len(spy.shapes) == 3 and spy.shapes[2][1] < 10  # the instruction was not run again
    finally:
        sprint_pipe.set_engine("text_encoder", spy.engine)


@pytest.mark.parametrize("chi", [None, "Describe the picture in detail.\nUser Prompt: "],
                         ids=["without instruction", "own instruction"])
def test_other_instructions(chi, reference_pipe, sprint_pipe, monkeypatch, engine_spy):
    """Without an instruction there is nothing to reuse (one run, every real token); an instruction of the
    caller's own gets its own prefix."""
    spy = engine_spy(sprint_pipe.text_encoder, "input_ids")
    monkeypatch.setattr(sprint_pipe, "text_encoder", spy)
    ids, mask = sprint_pipe.tokenizer(["a red barn in a field"], 64, chi)
    ours = sprint_pipe._encode_tokens(ids, mask, chi)
    assert _close(ours, _gemma2(reference_pipe, ids, mask), mask)
    used = int(mask.sum())
    if chi is None:
        assert spy.shapes == [(1, used)]
    else:
        own = len(sprint_pipe.tokenizer.instruction_ids(chi))
        assert spy.shapes[0] == (1, own) and spy.shapes[1][1] <= used - own + 1


def test_a_narrow_profile_caches_what_fits(reference_pipe, sprint_pipe):
    """A TensorRT profile may bound the past below the instruction's length: the prefix is cut to fit, and the
    hidden states stay Gemma2's."""
    limits = dict(sprint_pipe.limits["text_encoder"], past_len=S.Bounds(1, 8, 8))
    runner = TextEncoderRunner(sprint_pipe.model_dims, limits)
    prefix = runner.prefix(sprint_pipe.text_encoder, sprint_pipe.tokenizer.instruction_ids(CHI))
    assert len(prefix.ids) == 8 and prefix.kv.shape[3] == 8
    ids, mask = sprint_pipe.tokenizer(["a glass of water"], 300, CHI)
    n = int(mask.sum())
    ours = runner.encode(sprint_pipe.text_encoder, ids[:, :n], mask[:, :n], prefix)
    assert _close(ours, _gemma2(reference_pipe, ids[:, :n], mask[:, :n]), mask[:, :n])


def test_reuse_can_be_switched_off(sprint_pipe, monkeypatch, engine_spy):
    spy = engine_spy(sprint_pipe.text_encoder, "input_ids")
    monkeypatch.setattr(sprint_pipe, "text_encoder", spy)
    monkeypatch.setattr(sprint_pipe, "reuse_instruction_prefix", False)
    ids, mask = sprint_pipe.tokenizer(["a koi pond"], 300, CHI)
    sprint_pipe._encode_tokens(ids, mask, CHI)
    assert spy.shapes == [(1, int(mask.sum()))]


def test_cache_instruction_runs_it_ahead_of_the_first_prompt(sprint_pipe, engine_spy):
    spy = engine_spy(sprint_pipe.text_encoder, "input_ids")
    sprint_pipe.set_engine("text_encoder", spy)
    try:
        sprint_pipe.cache_instruction()
        instruction = len(sprint_pipe.tokenizer.instruction_ids(CHI))
        assert spy.shapes == [(1, instruction)]
        sprint_pipe.encode_prompt("an owl", complex_human_instruction=list(DEFAULT_COMPLEX_HUMAN_INSTRUCTION))
        assert len(spy.shapes) == 2 and spy.shapes[1][1] < 10
    finally:
        sprint_pipe.set_engine("text_encoder", spy.engine)
