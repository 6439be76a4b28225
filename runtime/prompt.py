"""Prompt → token ids and mask, exactly as SanaSprintPipeline prepares them, with `tokenizers`
(docs/SANA_SPRINT_SPEC.md §1).

Lowercase + strip, the complex human instruction (CHI) prepended with no separator, right padding to
defaults.tokenized_length (n_chi + max_sequence_length - 2 with CHI), truncation on the right,
`<bos>` prepended by the tokenizer's post-processor, no `<eos>`. After the text encoder the rows are
sliced with select_index = [0, -(N-1), ..., -1].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sprintrt.defaults import MAX_SEQUENCE_LENGTH_LIMIT, tokenized_length
from sprintrt.errors import EngineDirError, InvalidInputError, notice


def preprocess(prompts) -> list[str]:
    """Validate and normalise prompts: a non-empty str or a non-empty list of them."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidInputError(f"prompt={prompts!r} is not allowed: expected a non-empty string or a non-empty list "
                                "of strings. Fix: pass e.g. prompt='a cat sleeping on a windowsill'")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidInputError(f"prompt[{i}]={p!r} is a {type(p).__name__}, expected a string. Fix: pass text")
        if not p.strip():
            raise InvalidInputError(f"prompt[{i}]={p!r} is empty: expected text with at least one non-space character. "
                                    "Fix: describe the image to generate")
        _check_utf8(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    return [p.lower().strip() for p in prompts]


def _check_utf8(text: str, name: str) -> None:
    """A str with a lone surrogate (bytes that were not UTF-8, e.g. argv decoded with surrogateescape) has no
    tokens: the tokenizer would fail with a TypeError deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"{name} is not valid UTF-8 text: {text[e.start:e.end]!r} at character {e.start} is a "
                                "lone surrogate (bytes that were not UTF-8). Fix: pass the prompt as UTF-8 "
                                "text") from None


def select_index(max_sequence_length: int) -> list[int]:
    """diffusers keeps the <bos> position and the last N-1 positions (paper §3.1)."""
    return [0] + list(range(-max_sequence_length + 1, 0))


class PromptTokenizer:
    """The checkpoint's tokenizer.json run by the `tokenizers` library (no transformers needed)."""

    def __init__(self, tokenizer_dir: str | Path):
        from tokenizers import Tokenizer

        tokenizer_dir = Path(tokenizer_dir)
        path = tokenizer_dir / "tokenizer.json"
        if not path.is_file():
            raise EngineDirError(f"{path} is missing: the engine directory has no tokenizer. Fix: rebuild it with "
                                 "`sprintrt build ONNX_DIR -o ENGINE_DIR`")
        self._tok = Tokenizer.from_file(str(path))
        config_path = tokenizer_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.pad_token = config.get("pad_token", "<pad>")
        if isinstance(self.pad_token, dict):
            self.pad_token = self.pad_token["content"]
        self.pad_id = self._tok.token_to_id(self.pad_token)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._instructions: dict[str, np.ndarray] = {}

    def count(self, text: str) -> int:
        """len(tokenizer.encode(text)) with special tokens, untruncated (how diffusers counts the CHI)."""
        return len(self.instruction_ids(text))

    def instruction_ids(self, chi: str) -> np.ndarray:
        """The token ids an instruction alone tokenizes to (<bos> first), unpadded, kept per instruction:
        the prefix every prompt's tokens start with (up to a merge at the boundary, see
        runtime/text_prefix.py)."""
        ids = self._instructions.get(chi)
        if ids is None:
            ids = np.array(self._tok.encode(chi, add_special_tokens=True).ids, dtype=np.int64)
            ids.setflags(write=False)
            if len(self._instructions) >= 64:  # requests may each bring their own instruction: stay bounded
                self._instructions.pop(next(iter(self._instructions)))
            self._instructions[chi] = ids
        return ids

    def text_length(self, max_sequence_length: int, chi: str | None) -> int:
        return tokenized_length(max_sequence_length, self.count(chi) if chi else None)

    def __call__(self, prompts: list[str], max_sequence_length: int, chi: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Returns (input_ids, attention_mask), int64 [B, L]."""
        length = self.text_length(max_sequence_length, chi)
        texts = [chi + p for p in prompts] if chi else list(prompts)
        self._tok.enable_truncation(max_length=length)
        self._tok.enable_padding(direction="right", length=length, pad_id=self.pad_id, pad_token=self.pad_token)
        try:
            encs = self._tok.encode_batch(texts, add_special_tokens=True)
        finally:
            self._tok.no_padding()
            self._tok.no_truncation()
        self._notice_truncation(texts, encs, length, max_sequence_length)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def _notice_truncation(self, texts: list[str], encs, length: int, max_sequence_length: int) -> None:
        """Say which prompts lost their tail to truncation, with the token counts (diffusers only warns
        through its logger, which a CLI user never sees)."""
        cut = [(i, len(self._tok.encode(t, add_special_tokens=True).ids)) for i, (t, e) in enumerate(zip(texts, encs))
               if e.overflowing]
        if not cut:
            return
        # Counted as max_sequence_length counts: the instruction's tokens (length - max_sequence_length) left out.
        counts = ", ".join(f"prompt[{i}] has {n - length + max_sequence_length}" for i, n in cut)
        notice(f"{counts} tokens, max_sequence_length={max_sequence_length} keeps {max_sequence_length}: the rest is "
               f"cut, as diffusers does, and does not reach the image. Fix: shorten the prompt, or raise "
               f"max_sequence_length (up to {MAX_SEQUENCE_LENGTH_LIMIT}, with engines built for it)")
