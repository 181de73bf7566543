"""Text data (issue 21.4): ``text:FILE?tokenizer=PATH&max_length=N`` tokenizes sentences with the
model's own tokenizer.json into int64 inputs named like the model's; npz files of int token arrays
work as well. Tokenizers are built in the tests with the ``tokenizers`` library, never downloaded."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from cli_util import run_cli  # noqa: E402
from text_data import sentences, trained_bpe_tokenizer, word_tokenizer, write_sentences  # noqa: E402
from transformer_models import BertLike, export_bert, sequence_task  # noqa: E402

from onnxprune.core.errors import OnnxPruneError, UnavailableError  # noqa: E402
from onnxprune.datasets import load_dataset, load_inputs  # noqa: E402

SEQ = 12


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    tok = trained_bpe_tokenizer(d / "tokenizer.json")
    (d / "s.txt").write_text("\n".join(sentences(50, seed=1, lo=2, hi=14)) + "\n\n  \n", encoding="utf-8")
    return d / "s.txt", tok


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """An exported BERT-style encoder (inputs input_ids, attention_mask; no token_type_ids) and
    sentences whose word tokenizer gives back the generated token arrays."""
    d = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    model = export_bert(BertLike(d=16, heads=4, ffn=32, layers=2, max_len=32).eval(), d / "enc.onnx", seq=SEQ)
    ids, mask, _ = sequence_task(120, SEQ, seed=3)
    return model, write_sentences(d / "s.txt", ids, mask), word_tokenizer(d / "tokenizer.json"), ids, mask


def test_sentences_become_int64_ids_mask_and_types_padded_and_truncated(bpe):
    text, tok = bpe
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok))
    ds = load_dataset(f"text:{text}?tokenizer={tok}&max_length=8&val=0&test=0")
    x = ds.train.x
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"} and ds.train.y is None
    assert all(a.dtype == np.int64 and a.shape == (50, 8) for a in x.values())
    lines = sentences(50, seed=1, lo=2, hi=14)
    for row, m, line in zip(x["input_ids"], x["attention_mask"], lines):
        want = t.encode(line).ids  # [CLS] ... [SEP], as the tokenizer's post-processor says
        n = int(m.sum())
        assert n == min(len(want), 8) and (m[:n] == 1).all() and (m[n:] == 0).all()
        assert row[0] == t.token_to_id("[CLS]") and row[n - 1] == t.token_to_id("[SEP]")
        assert (row[n:] == t.token_to_id("[PAD]")).all()  # the tokenizer's own pad id, not 0 by chance
        if len(want) <= 8:
            assert list(row[:n]) == want
    assert (x["token_type_ids"] == 0).all()
    assert any("truncated" in note for note in ds.notes)

    longest = load_dataset(f"text:{text}?tokenizer={tok}&val=0&test=0").train.x
    width = max(len(t.encode(s).ids) for s in lines)
    assert longest["input_ids"].shape == (50, width) > (50, 8)  # no max_length: longest, never truncated
    short = load_dataset(f"text:{text}?tokenizer={tok}&max_length=64&padding=longest&val=0&test=0").train.x
    assert short["input_ids"].shape == (50, width)


def test_inputs_bound_to_the_model_are_only_the_ones_it_has(encoder):
    model, text, tok, ids, mask = encoder
    x = load_inputs(f"text:{text}?tokenizer={tok}&max_length={SEQ}&val=0&test=0", model)
    assert set(x) == {"input_ids", "attention_mask"}  # the encoder has no token_type_ids input
    np.testing.assert_array_equal(x["input_ids"], ids)
    np.testing.assert_array_equal(x["attention_mask"], mask)
    train = load_inputs(f"text:{text}?tokenizer={tok}&max_length={SEQ}&split=train", model)
    assert len(train["input_ids"]) == 72  # 60 % of 120: val and test carved at random

    three = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["input_ids", "token_type_ids"], ["s"]), helper.make_node("Mul", ["s", "attention_mask"], ["y"])],
        "g", [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
              for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])]), opset_imports=[helper.make_opsetid("", 17)])
    got = load_inputs(f"text:{text}?tokenizer={tok}&max_length={SEQ}", three)
    assert list(got) == ["input_ids", "attention_mask", "token_type_ids"]


def test_text_data_wherever_data_are_taken(encoder, tmp_path):
    model, text, tok, ids, mask = encoder
    spec = f"text:{text}?tokenizer={tok}&max_length={SEQ}"
    code, out, err = run_cli("prune", model, "-o", tmp_path / "p.onnx", "--structured", "--ratio", "0.5",
                             "--calibrate", spec + "&split=val", "--json")
    assert code == 0, err
    cal = json.loads(out)["calibration"]
    assert cal["split"] == "val" and cal["samples"] == 24 and cal["mask"] == "attention_mask"

    code, out, err = run_cli("eval", tmp_path / "p.onnx", "--data", spec, "--reference", model, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["output_kinds"]["embedding"] == "embedding" and res["samples"] == 24
    assert 0.5 < res["fidelity"]["embedding"]["mean_cosine"] < 1.0

    code, out, err = run_cli("finetune", tmp_path / "p.onnx", "-o", tmp_path / "ft.onnx", "--teacher", model,
                             "--data", spec, "--steps", "3", "--batch-size", "16", "--no-progress", "--json")
    assert code == 0, err
    assert json.loads(out)["output_kinds"] == {"embedding": "embedding"}
    assert (tmp_path / "ft.onnx").exists()


def test_npz_of_int_token_arrays_works_too(encoder, tmp_path):
    model, _, _, ids, mask = encoder
    np.savez(tmp_path / "tok.npz", input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32))
    x = load_inputs(f"npz:{tmp_path / 'tok.npz'}?val=0&test=0", model)
    assert all(a.dtype == np.int64 for a in x.values())  # int32 ids cast to the model's int64
    np.testing.assert_array_equal(x["input_ids"], ids)
    code, out, err = run_cli("prune", model, "-o", tmp_path / "p.onnx", "--structured", "--ratio", "0.5",
                             "--calibrate", f"npz:{tmp_path / 'tok.npz'}?split=all", "--json")
    assert code == 0, err
    assert json.loads(out)["calibration"]["mask"] == "attention_mask"
    code, out, err = run_cli("eval", tmp_path / "p.onnx", "--data", f"npz:{tmp_path / 'tok.npz'}", "--reference",
                             model, "--json")
    assert code == 0, err and "mean_cosine" in json.loads(out)["fidelity"]["embedding"]


@pytest.mark.parametrize("case, message", [
    ("no_file", "no such file"),
    ("no_tokenizer_option", "add ?tokenizer=PATH/tokenizer.json"),
    ("tokenizer_missing", "no such file"),
    ("bad_tokenizer", "is not a tokenizer file"),
    ("empty", "holds no sentences"),
    ("not_utf8", "is not UTF-8 text"),
    ("bad_max_length", "max_length='0' must be positive"),
    ("bad_padding", "padding='left' must be max_length or longest"),
    ("unknown_key", "unknown option(s) colour"),
])
def test_bad_text_data_is_one_error_line(encoder, tmp_path, case, message):
    model, text, tok, _, _ = encoder
    (tmp_path / "bad.json").write_text('{"model": "nothing of the kind"}')
    (tmp_path / "empty.txt").write_text("\n   \n\n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    spec = {"no_file": f"text:{tmp_path / 'none.txt'}?tokenizer={tok}",
            "no_tokenizer_option": f"text:{text}",
            "tokenizer_missing": f"text:{text}?tokenizer={tmp_path / 'none.json'}",
            "bad_tokenizer": f"text:{text}?tokenizer={tmp_path / 'bad.json'}",
            "empty": f"text:{tmp_path / 'empty.txt'}?tokenizer={tok}",
            "not_utf8": f"text:{tmp_path / 'latin.txt'}?tokenizer={tok}",
            "bad_max_length": f"text:{text}?tokenizer={tok}&max_length=0",
            "bad_padding": f"text:{text}?tokenizer={tok}&padding=left",
            "unknown_key": f"text:{text}?tokenizer={tok}&colour=red"}[case]
    before = text.read_bytes()
    code, out, err = run_cli("eval", model, "--data", spec, "--reference", model)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and text.read_bytes() == before
    with pytest.raises(OnnxPruneError, match="data"):
        load_dataset(spec)


def test_without_the_tokenizers_package_exit_3_names_the_install_line(encoder, monkeypatch):
    model, text, tok, _, _ = encoder
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    with pytest.raises(UnavailableError):
        load_dataset(f"text:{text}?tokenizer={tok}")
    code, out, err = run_cli("eval", model, "--data", f"text:{text}?tokenizer={tok}", "--reference", model)
    assert code == 3 and "pip install 'onnxprune[text]'" in err and len(err.strip().splitlines()) == 1, err
