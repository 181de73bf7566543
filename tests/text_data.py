"""Text data for the tests and the transformer benchmark: tokenizers built here, never downloaded.

- :func:`word_tokenizer`: a ``tokenizers`` WordLevel tokenizer whose ids are those of
  tests/transformer_models.py's generated token task (``[PAD]`` = 0, words ``w1``..``w11`` = 1..11),
  so sentences written by :func:`write_sentences` tokenize back into the very arrays the encoders
  were trained on;
- :func:`trained_bpe_tokenizer`: a BPE tokenizer trained on a few generated sentences, with
  ``[CLS] ... [SEP]`` added by its post-processor and a sentence-pair ``token_type_ids``, as a
  BERT-style ``tokenizer.json`` has.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from transformer_models import VOCAB

WORDS = ("the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "big", "small", "red", "blue")


def word_tokenizer(path: str | Path) -> Path:
    """``tokenizer.json`` mapping ``w1``..``w{VOCAB-1}`` to ids 1..VOCAB-1 and ``[PAD]`` to 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, **{f"w{i}": i for i in range(1, VOCAB)}, "[UNK]": VOCAB}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return Path(path)


def write_sentences(path: str | Path, ids: np.ndarray, mask: np.ndarray) -> Path:
    """One sentence per line: the real tokens of each row of ``ids`` as words ``w<id>``."""
    lines = [" ".join(f"w{t}" for t in row[m.astype(bool)]) for row, m in zip(ids, mask)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def sentences(n: int, seed: int = 0, lo: int = 2, hi: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def trained_bpe_tokenizer(path: str | Path, seed: int = 0) -> Path:
    """A BPE tokenizer trained on generated sentences, BERT-style special tokens and pair template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences(300, seed), trainers.BpeTrainer(
        vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(path))
    return Path(path)
