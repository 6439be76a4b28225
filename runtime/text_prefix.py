"""The text encoder over right-padded tokens, reusing the instruction prefix's work across prompts.

Every prompt with the complex human instruction (CHI) starts with the same ~120 tokens, most of the
text encoder's work per image. Gemma2 is causal: the hidden states, keys and values at those positions
depend on those tokens only. So they are computed once per instruction (an `InstructionPrefix`), and each
prompt then runs the encoder over its own tokens only, with the cached keys and values as the past (the
graph's interface: sprintrt/specs.py text_encoder_spec). The result is the one full run's, up to float
rounding (tests/runtime/test_text_prefix.py compares both with transformers' Gemma2Model).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from sprintrt import specs as S


@dataclass(frozen=True)
class InstructionPrefix:
    """The encoder's work on an instruction's tokens (<bos> included), batch axis dropped."""

    ids: np.ndarray  # [P] int64
    hidden: np.ndarray  # [P, D] last_hidden_state
    kv: np.ndarray  # [layers, 2, kv_heads, P, head_dim] keys and values


def no_past(dims: S.ModelDims, batch: int) -> dict[str, np.ndarray]:
    """The past of a run without a prefix: one placeholder slot, masked out (the graph has no empty axis)."""
    kv = np.zeros((dims.text_layers, 2, batch, dims.text_kv_heads, 1, dims.text_head_dim), np.float32)
    return {"past_key_values": kv, "past_attention_mask": np.zeros((batch, 1), np.int64)}


def prefix_past(prefix: InstructionPrefix, length: int, batch: int) -> dict[str, np.ndarray]:
    """The first `length` positions of a prefix as the past of `batch` rows."""
    kv = prefix.kv[:, :, None, :, :length]
    kv = np.ascontiguousarray(np.broadcast_to(kv, kv.shape[:2] + (batch,) + kv.shape[3:]))
    return {"past_key_values": kv, "past_attention_mask": np.ones((batch, length), np.int64)}


def shared_length(prefix_ids: np.ndarray, ids: np.ndarray) -> int:
    """How many leading tokens every row of `ids` [B, L] shares with `prefix_ids` [P]. The instruction's
    last token may merge with the prompt's first one in the tokenizer, so this is counted, not assumed."""
    n = min(len(prefix_ids), ids.shape[1])
    same = ids[:, :n] == prefix_ids[None, :n]
    return int(np.min(np.where(same.all(axis=1), n, np.argmin(same, axis=1))))


class TextEncoderRunner:
    """Runs a text-encoder engine (`engine(**feeds) -> {name: array}`) with or without a cached prefix."""

    def __init__(self, dims: S.ModelDims, limits: dict[str, S.Bounds], max_prefixes: int = 4):
        self.dims, self.limits, self.max_prefixes = dims, limits, max_prefixes
        self._prefixes: dict[bytes, InstructionPrefix] = {}
        self._lock = threading.Lock()  # a server may call one pipeline from several threads

    def run(self, engine, ids: np.ndarray, mask: np.ndarray, past: dict | None = None) -> dict[str, np.ndarray]:
        return engine(input_ids=ids, attention_mask=mask, **(past or no_past(self.dims, len(ids))))

    def clear(self) -> None:
        """Forget the cached prefixes (the pipeline calls it when its text encoder is swapped)."""
        with self._lock:
            self._prefixes.clear()

    def prefix(self, engine, prefix_ids: np.ndarray) -> InstructionPrefix:
        """The instruction's prefix, computed on first use and kept per token sequence."""
        # The engine's profile bounds what can be cached (a TensorRT profile may be narrow).
        prefix_ids = prefix_ids[:min(len(prefix_ids), self.limits["past_len"].max, self.limits["text_len"].max)]
        key = prefix_ids.tobytes()
        with self._lock:
            found = self._prefixes.get(key)
        if found is not None:
            return found
        ids = prefix_ids[None]
        out = self.run(engine, ids, np.ones_like(ids))
        found = InstructionPrefix(prefix_ids, out["last_hidden_state"][0], out["present_key_values"][:, :, 0])
        with self._lock:
            self._prefixes[key] = found
            while len(self._prefixes) > self.max_prefixes:
                self._prefixes.pop(next(iter(self._prefixes)))
        return found

    def encode(self, engine, ids: np.ndarray, mask: np.ndarray, prefix: InstructionPrefix | None) -> np.ndarray:
        """last_hidden_state [B, L, D] of right-padded tokens, after the prefix's shared tokens if any."""
        shared = shared_length(prefix.ids, ids) if prefix is not None else 0
        # At least the engine's shortest text stays to run; fewer than 2 shared tokens is not worth a past.
        shared = min(shared, ids.shape[1] - self.limits["text_len"].min)
        if shared < 2:
            return self.run(engine, ids, mask)["last_hidden_state"]
        new = self.run(engine, ids[:, shared:], mask[:, shared:], prefix_past(prefix, shared, len(ids)))
        hidden = np.empty((len(ids), ids.shape[1], self.dims.text_hidden), np.float32)
        hidden[:, :shared] = prefix.hidden[None, :shared]
        hidden[:, shared:] = new["last_hidden_state"]
        return hidden
