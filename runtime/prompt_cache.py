"""An opt-in, bounded LRU cache of text-encoder outputs, for services that see repeated prompts.

Keyed by the encoder's identity (the engine file's sha256, so engines of another model or precision
never share entries) and the exact token ids and mask of one prompt row. Values are that row's
hidden states over its real tokens only; positions past them are zeros when the pipeline
reassembles a batch, which the transformer never reads (they are masked, see
SprintPipeline._encode_tokens). One cache may serve several pipelines.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from sprintrt.errors import invalid


class PromptEmbeddingCache:
    def __init__(self, max_entries: int = 64):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise invalid("max_entries", max_entries, "an integer >= 1 (each entry holds one prompt's hidden states, "
                          "~1.2 MB for Gemma2-2B after a complex human instruction)", "pass e.g. max_entries=64")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # a server may call one pipeline from several threads

    @staticmethod
    def key(encoder_id: str, ids: np.ndarray, mask: np.ndarray) -> tuple:
        return encoder_id, ids.shape[-1], ids.tobytes(), mask.tobytes()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        value = np.array(value, copy=True)
        value.setflags(write=False)  # callers get the stored array itself: nobody may change it
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0
