"""``text:FILE?tokenizer=PATH&max_length=N``: sentences tokenized into a text model's int64 inputs.

One sentence per line (UTF-8; blank lines skipped), tokenized with the model's own ``tokenizer.json``
(Hugging Face's ``tokenizers`` library, the ``[text]`` extra, imported only when such a spec is
read) into ``input_ids``, ``attention_mask`` and ``token_type_ids``: the names Hugging Face exports
give these inputs. Binding the data to a model keeps only the arrays the model has as inputs.

Unlabeled, so val/test are carved at random like any unlabeled data (``val=``/``test=``,
``split=``). Every sentence of the file is padded to one length, so all splits share it:
``max_length=N`` truncates to N tokens and pads to N (``padding=longest``: to the longest sentence
after truncation); without it, sentences are padded to the longest and never truncated.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import OnnxPruneError, UnavailableError
from .spec import ParsedSpec, Preprocess
from .types import DatasetSplits, _existing
from .unlabeled import assemble_unlabeled

INSTALL = "pip install 'onnxprune[text]'"
#: the options a ``text:`` spec takes besides the common ones
TEXT_KEYS = ("tokenizer", "max_length", "padding")
#: the arrays produced, named as Hugging Face exports name a text model's inputs
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: pad tokens looked up (in this order) when the tokenizer file declares no padding
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>")


def read_sentences(path: Path, what: str) -> list[str]:
    """The non-blank lines of ``path`` (UTF-8, trailing whitespace and newlines stripped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OnnxPruneError(f"{what}: {path} is not UTF-8 text (byte {exc.start}); "
                             "expected one sentence per line") from None
    except OSError as exc:
        raise OnnxPruneError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise OnnxPruneError(f"{what}: {path} holds no sentences (expected one sentence per line)")
    return lines


def load_tokenizer(path: Path, what: str) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file; one error line when it is not one."""
    try:
        from tokenizers import Tokenizer  # lazy: optional dependency ([text] extra)
    except ImportError:
        raise UnavailableError(f"{what}: text data need the 'tokenizers' package: {INSTALL}") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises a bare Exception for any bad file
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise OnnxPruneError(f"{what}: {path} is not a tokenizer file of the 'tokenizers' library "
                             f"(a Hugging Face tokenizer.json): {reason}") from None


def _max_length(parsed: ParsedSpec) -> int | None:
    v = parsed.options.get("max_length")
    if v in (None, ""):
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"data spec {parsed.text!r}: max_length={v!r} is not a whole number") from None
    if n <= 0:
        raise OnnxPruneError(f"data spec {parsed.text!r}: max_length={v!r} must be positive")
    return n


def _pad_id(tok: Any) -> tuple[int, str]:
    """The tokenizer's own padding token if its file declares one, else a known pad token, else 0."""
    if tok.padding:
        return int(tok.padding["pad_id"]), str(tok.padding["pad_token"])
    for t in PAD_TOKENS:
        i = tok.token_to_id(t)
        if i is not None:
            return int(i), t
    return 0, str(tok.id_to_token(0))


def tokenize(sentences: list[str], tok: Any, max_length: int | None, padding: str) -> tuple[dict[str, np.ndarray], int]:
    """Sentences -> (int64 ``input_ids``/``attention_mask``/``token_type_ids`` of one common length,
    how many sentences were truncated); special tokens added as the tokenizer's post-processor says."""
    pad_id, pad_token = _pad_id(tok)
    if max_length is not None:
        tok.enable_truncation(max_length=max_length)
    else:
        tok.no_truncation()
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token,
                       length=max_length if (max_length is not None and padding == "max_length") else None)
    enc = tok.encode_batch(sentences)
    arrays = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
              "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
              "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
    return arrays, sum(bool(e.overflowing) for e in enc)


def load_text(parsed: ParsedSpec, pre: Preprocess, seed: int) -> DatasetSplits:
    """``text:FILE?tokenizer=PATH[&max_length=N][&padding=max_length|longest]``: unlabeled token arrays."""
    what = f"data {parsed.text!r}"
    path = _existing(parsed.arg, parsed, want_dir=False)
    if parsed.options.get("tokenizer") in (None, ""):
        raise OnnxPruneError(f"{what}: text data need the model's tokenizer: add ?tokenizer=PATH/tokenizer.json")
    tok_path = _existing(str(parsed.options["tokenizer"]), parsed, want_dir=False)
    max_length = _max_length(parsed)
    padding = str(parsed.options.get("padding") or "max_length").lower()
    if padding not in ("max_length", "longest"):
        raise OnnxPruneError(f"{what}: padding={padding!r} must be max_length or longest")
    sentences = read_sentences(path, what)
    arrays, n_cut = tokenize(sentences, load_tokenizer(tok_path, what), max_length, padding)
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    if ids.shape[1] == 0:
        raise OnnxPruneError(f"{what}: the tokenizer gives no tokens for any sentence of {path}")
    truncated = f", {n_cut} truncated" if n_cut else ""
    note = (f"{len(sentences)} sentences from {path}, tokenized by {tok_path} to {ids.shape[1]} tokens "
            f"({mask.mean():.0%} real, the rest padding{truncated})")
    return assemble_unlabeled(parsed, pre, seed, arrays, notes=[note])
