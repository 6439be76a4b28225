"""An offline Gemma tokenizer for seeded checkpoints (the real one is on the hub, out of reach here).

Same class, normalizer, byte fallback and special-token ids as gemma-2-2b-it (<pad>=0, <eos>=1,
<bos>=2, <unk>=3, <mask>=4); only the BPE vocabulary is small, learned deterministically from the
complex human instruction and the shipped prompt file so prompts tokenize into realistic lengths.
"""

from __future__ import annotations

import json

from sprintrt.defaults import DEFAULT_COMPLEX_HUMAN_INSTRUCTION as DEFAULT_CHI

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
VOCAB_SIZE = 1024


def shipped_prompts() -> list[str]:
    from sprintrt.prompts import read_prompts

    return read_prompts(None)


def build_tokenizer():
    """A transformers GemmaTokenizer with a small BPE vocabulary trained offline."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    alphabet = sorted(set("".join(list(DEFAULT_CHI) + shipped_prompts()).replace(" ", "\u2581")) | set("abcdefghijklmnopqrstuvwxyz0123456789\u2581"))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(bytes_), special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False, limit_alphabet=len(alphabet))
    corpus = ["\n".join(DEFAULT_CHI), *DEFAULT_CHI, *shipped_prompts()]
    bpe.train_from_iterator(corpus, trainer=trainer)
    trained = bpe.get_vocab()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + bytes_)}
    for tok, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
