"""Prompt tokenization with `tokenizers` vs the transformers tokenizer called as diffusers calls it."""

from __future__ import annotations

import numpy as np
import pytest

from sprintrt.errors import InvalidInputError
from sprintrt.defaults import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from sprintrt.runtime.prompt import PromptTokenizer, preprocess, select_index

CHI = "\n".join(DEFAULT_COMPLEX_HUMAN_INSTRUCTION)
PROMPTS = ["a cat", "A Busy City Street at dusk, with LAMPS!", "  naïve café ☕ 東京  ",
           "word " * 400]  # the last one is truncated on the right


@pytest.mark.parametrize("chi", [CHI, None])
@pytest.mark.parametrize("max_len", [300, 17])
def test_ids_and_mask_match_transformers(reference_pipe, tiny_checkpoint, chi, max_len):
    hf = reference_pipe.tokenizer
    hf.padding_side = "right"
    texts = [(chi or "") + p for p in preprocess(PROMPTS)]
    length = max_len if chi is None else len(hf.encode(chi)) + max_len - 2
    ref = hf(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
             return_tensors="np")
    ours = PromptTokenizer(tiny_checkpoint / "tokenizer")
    ids, mask = ours(preprocess(PROMPTS), max_len, chi)
    assert ours.text_length(max_len, chi) == length
    assert np.array_equal(ids, ref["input_ids"])
    assert np.array_equal(mask, ref["attention_mask"])
    assert ids[:, 0].tolist() == [2] * len(PROMPTS)  # <bos>, no <eos>


def test_select_index_is_diffusers():
    assert select_index(4) == [0, -3, -2, -1]
    assert len(select_index(300)) == 300


def test_preprocess_lowercases_and_strips():
    assert preprocess("  A Red FOX ") == ["a red fox"]


@pytest.mark.parametrize("bad", [None, "", "   ", [], ["ok", ""], ["ok", 3], 42, b"bytes"])
def test_bad_prompts_raise_typed_errors(bad):
    with pytest.raises(InvalidInputError, match="prompt"):
        preprocess(bad)
