"""Issue 21.4: ``finetune --distill-features`` on a transformer matches the residual stream (every
block's output keeps the dense width when heads and FFN columns are pruned), per channel normalised,
padding positions left out; a CNN still matches its pruned layers' outputs.

The BERT-style encoder of tests/transformer_models.py is trained here, exported, pruned to half its
MACs (heads and FFN columns, no calibration), and retrained from the dense model on unlabeled padded
sequences with and without the features, the same steps and seed.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from cli_util import run_cli  # noqa: E402
from transformer_models import BertLike, TinyLlama, export_bert, export_llama, sequence_task, train_bert  # noqa: E402

from onnxprune.datasets import load_dataset  # noqa: E402
from onnxprune.training.features import STREAM, select_features, stream_loss  # noqa: E402
from onnxprune.training.stream import residual_stream  # noqa: E402

SEQ = 16


def cosine_to_dense(path, dense, ids, mask) -> float:
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"input_ids": ids, "attention_mask": mask})[0]
    e, d = run(path), run(dense)
    return float(((e * d).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(d, axis=1))).mean())


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """(dir, dense, pruned 2x, unlabeled npz spec)."""
    d = tmp_path_factory.mktemp("featd")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = export_bert(train_bert(BertLike(d=32, heads=4, ffn=64, layers=2, max_len=32), steps=150, seq=SEQ),
                        d / "dense.onnx", seq=SEQ)
    code, out, err = run_cli("prune", dense, "-o", d / "pruned.onnx", "--structured", "--target-macs", "0.5",
                             "--input-shape", f"input_ids=1x{SEQ}", "--input-shape", f"attention_mask=1x{SEQ}",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["macs_reduction"] >= 1.9
    ids, mask, _ = sequence_task(320, SEQ, seed=5)  # unlabeled, about a quarter of positions padding
    np.savez(d / "unl.npz", input_ids=ids, attention_mask=mask)
    yield d, dense, d / "pruned.onnx", f"npz:{d / 'unl.npz'}"
    torch.set_num_threads(prev)


def test_the_residual_stream_is_selected_with_the_attention_mask(encoder):
    _, dense, pruned, spec = encoder
    student, teacher = onnx.load(pruned), onnx.load(dense)
    match = select_features(student, teacher, load_dataset(spec))
    producers = {o: n.op_type for n in teacher.graph.node for o in n.output}
    assert match.at == STREAM and match.mask_name == "attention_mask" and match.mask_index == 1
    # embedding LayerNorm, then per post-LN layer: attention Add, LN, FFN Add, LN; the pooled output is not one
    assert [producers[n] for n in match.names] == ["LayerNormalization"] + ["Add", "LayerNormalization"] * 4
    assert "embedding" not in match.names and all(n.startswith("/layers.") for n in match.names[1:])


def test_rmsnorm_written_out_and_pre_ln_adds_are_on_the_stream(tmp_path):
    model = onnx.load(export_llama(TinyLlama(), tmp_path / "llama.onnx"))
    names = residual_stream(model)
    # per pre-LN layer: RMSNorm, attention Add, RMSNorm, MLP Add; then the final RMSNorm (logits are the output)
    norms = [n for n in names if "/n1/" in n or "/n2/" in n or n.startswith("/norm/")]
    adds = [n for n in names if n not in norms]
    assert len(norms) == 5 and len(adds) == 4 and names[-1].startswith("/norm/"), names
    producers = {o: n for n in model.graph.node for o in n.output}
    assert all(producers[n].op_type == "Add" for n in adds) and all(producers[n].op_type == "Mul" for n in norms)
    assert "logits" not in names


def test_the_loss_is_per_channel_normalised_and_blind_to_padding():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 4, generator=g) * torch.tensor([1.0, 10.0, 100.0, 0.1])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    sd = torch.tensor([1.0, 10.0, 100.0, 0.1])
    # one standard deviation off in every channel: 1 whatever the channel's scale
    assert float(stream_loss([t + sd], [t], [sd], mask)) == pytest.approx(1.0, rel=1e-5)
    s = t + 0.3 * sd
    base = float(stream_loss([s], [t], [sd], mask))
    s_pad = s.clone()
    s_pad[0, 3:] += 1e3  # padded positions: nothing
    s_pad[1, 4] -= 1e3
    assert float(stream_loss([s_pad], [t], [sd], mask)) == pytest.approx(base, rel=1e-6)
    s_tok = s.clone()
    s_tok[0, 2] += 1.0
    assert float(stream_loss([s_tok], [t], [sd], mask)) > base + 0.01
    # without the mask the padding counts
    assert float(stream_loss([s_pad], [t], [sd], None)) > 100 * base


def test_features_bring_the_pruned_encoder_closer_than_outputs_alone(encoder):
    d, dense, pruned, spec = encoder
    held_ids, held_mask, _ = sequence_task(300, SEQ, seed=9)  # never trained on
    cos = {"pruned": cosine_to_dense(pruned, dense, held_ids, held_mask)}
    hist = {}
    for name, extra in (("outputs", []), ("features", ["--distill-features"])):
        code, out, err = run_cli("finetune", pruned, "-o", d / f"{name}.onnx", "--teacher", dense, "--data", spec,
                                 "--steps", "80", "--optimizer", "adamw", "--lr", "1e-3", "--batch-size", "32",
                                 "--seed", "0", "--no-progress", "--json", *extra)
        assert code == 0, err
        hist[name] = json.loads(out)
        cos[name] = cosine_to_dense(d / f"{name}.onnx", dense, held_ids, held_mask)
    print("mean cosine to dense on held-out sequences:", {k: round(v, 4) for k, v in cos.items()})
    h = hist["features"]
    assert h["distill_features_at"] == "residual_stream" and h["distill_features_mask"] == "attention_mask"
    assert len(h["distill_features"]) == 9 and "distill_features" not in hist["outputs"]
    # measured on the shared 2-core CPU: pruned 0.881, outputs only 0.992, with features 0.994
    assert cos["pruned"] < 0.95
    assert 1 - cos["outputs"] < (1 - cos["pruned"]) / 5
    assert 1 - cos["features"] < 0.9 * (1 - cos["outputs"])


def test_a_cnn_falls_back_to_the_pruned_layers(tmp_path):
    from onnxprune import api
    from onnxprune.commands.demo_model import build_digits_cnn

    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(build_digits_cnn(width=8).eval(), (torch.zeros(1, 1, 8, 8),), str(tmp_path / "cnn.onnx"),
                          dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    api.prune(tmp_path / "cnn.onnx", tmp_path / "half.onnx", method="unstructured", sparsity=0.5)
    code, out, err = run_cli("finetune", tmp_path / "half.onnx", "-o", tmp_path / "ft.onnx", "--teacher",
                             tmp_path / "cnn.onnx", "--data", "digits", "--steps", "4", "--distill-features",
                             "--feature-weight", "2", "--no-progress", "--json")
    assert code == 0, err
    h = json.loads(out)
    assert h["distill_features_at"] == "pruned_layers" and h["distill_features_mask"] is None
    assert h["distill_features"] and all(n.endswith("Conv_output_0") for n in h["distill_features"])
    assert h["config"]["feature_weight"] == 2.0 and h["sparsity"]["preserved"]


@pytest.mark.parametrize("flag, value, says", [("--feature-weight", "-1", "feature_weight must be a non-negative"),
                                               ("--feature-mask", "input_ids", "--feature-mask input_ids")])
def test_bad_feature_options_are_one_error_line(encoder, flag, value, says):
    d, dense, pruned, spec = encoder
    code, out, err = run_cli("finetune", pruned, "-o", d / "bad.onnx", "--teacher", dense, "--data", spec,
                             "--steps", "1", "--distill-features", flag, value, "--no-progress")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err
    assert not (d / "bad.onnx").exists()
