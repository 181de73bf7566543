"""Head and FFN importance from data (issue 21.4): ``--criterion activation`` scores a head by the
variance its ``head_dim`` columns put through the output projection on calibration tokens (FLAP's
fluctuation metric, ``Var(x_j) * ||W_out[:, j]||^2`` summed over the head's columns; an FFN column
by its own), padding tokens left out; heads go whole.

``--criterion fisher`` (Kwon et al. 2022, label-free): the Fisher information of each head's / column's
mask for the output's distance to dense, through the bridge.

Shown on a BERT-style encoder trained in the test: at the same MACs, with no calibration re-fit, the
data-aware criteria keep the dense embedding better than l1 on the weights alone.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli
from conftest import run_ort
from transformer_models import BertLike, bert_feeds, export_bert, sequence_task, train_bert
from onnxprune.calibration import StructuredCalibration
from onnxprune.calibration import fisher as fisher_module
from onnxprune.calibration.fisher import mask_gradients
from onnxprune.channels import analyze_channels
from onnxprune.core.prepare import prepare
from onnxprune.structured.importance import ScoreInputs, score_groups
from onnxprune.structured.prune import prune_structured

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

D, HEADS, FFN, LAYERS, SEQ = 32, 8, 64, 2, 12
SHAPES = {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, one_torch_thread):
    """A trained 2-layer encoder (hidden 32, 8 heads of 4, FFN 64): a few seconds."""
    torch.manual_seed(0)
    model = train_bert(BertLike(D, HEADS, FFN, LAYERS), steps=100, seq=SEQ)
    return export_bert(model, tmp_path_factory.mktemp("enc") / "enc.onnx")


@pytest.fixture(scope="module")
def data():
    ids, mask, _ = sequence_task(160, SEQ, seed=5)
    return ({"input_ids": ids[:128], "attention_mask": mask[:128]},
            {"input_ids": ids[128:], "attention_mask": mask[128:]})


def _fidelity(pruned, dense_path, feeds) -> tuple[float, float]:
    """(relative L2, mean cosine) of the pruned embeddings to the dense ones."""
    ref, out = run_ort(str(dense_path), feeds)[0], run_ort(pruned, feeds)[0]
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float(cos.mean())


@pytest.fixture(scope="module")
def pruned_half(encoder, data):
    """Half of every head group and FFN (the same MACs whatever the criterion), no re-fit: per
    criterion (MACs after, relative L2 and mean cosine of the embeddings to dense on held-out inputs)."""
    cal, held_out = data
    res = {}
    for crit in ("l1", "activation", "fisher"):
        r = prune_structured(str(encoder), ratio=0.5, criterion=crit, input_shapes=SHAPES,
                             calibration=StructuredCalibration(cal, method="none"))
        assert r.summary["calibration"]["method"] == "none"  # nothing re-fitted: the choice alone
        assert {g["total"]: g["kept"] for g in r.summary["groups"]} == {HEADS: HEADS // 2, FFN: FFN // 2}
        res[crit] = (r.summary["macs_after"], *_fidelity(r.model, encoder, held_out))
    return res


@pytest.mark.parametrize("criterion, factor", [("activation", 0.9), ("fisher", 0.95)])
def test_data_aware_criteria_keep_the_dense_output_better_than_l1(pruned_half, criterion, factor):
    """The data-aware scores move the embedding clearly less than l1 on the weights (measured here:
    rel_l2 0.465 l1, 0.377 activation, 0.411 fisher)."""
    (macs_l1, rel_l1, cos_l1), (macs, rel, cos) = pruned_half["l1"], pruned_half[criterion]
    assert macs == macs_l1  # same MACs
    assert rel < factor * rel_l1, pruned_half
    assert cos > cos_l1, pruned_half


def test_head_scores_sum_the_out_projection_columns_of_each_head(encoder, data):
    """A head's score is the sum over its head_dim columns of the out-projection's per-column
    energy, one score per head: the group's channels are whole heads."""
    cal, _ = data
    prep = prepare(str(encoder), SHAPES)
    an = analyze_channels(prep.view)
    calib = StructuredCalibration(cal)
    energies = calib.channel_energies(prep.view, prep.model, an)
    heads = [g for g in an.prunable if g.size == HEADS]
    assert len(heads) == LAYERS
    scores, unavailable = score_groups(heads, "activation", ScoreInputs.from_view(prep.view, activations=energies))
    assert not unavailable
    dh = D // HEADS
    for g in heads:
        (out_proj,) = [m for m in g.members if m.role == "in"]
        e = energies[out_proj.tensor]
        assert e.shape == (D,)
        per_head = np.array([e[out_proj.positions.of_channels([h])].sum() for h in range(HEADS)])
        assert all(len(out_proj.positions.of_channels([h])) == dh for h in range(HEADS))
        np.testing.assert_allclose(scores[g.id], per_head / per_head.mean(), rtol=1e-9)


def test_padding_tokens_do_not_count_in_head_and_ffn_scores(encoder, data):
    """Changing the tokens at padding positions changes the hidden states there, never the scores
    (the attention mask leaves those rows out); with the mask ignored they do change."""
    cal, _ = data
    assert (cal["attention_mask"] == 0).any()
    other = dict(cal, input_ids=np.where(cal["attention_mask"] == 1, cal["input_ids"], 7))
    prep = prepare(str(encoder), SHAPES)
    an = analyze_channels(prep.view)

    def energies(inputs, mask):
        return StructuredCalibration(inputs, mask=mask).channel_energies(prep.view, prep.model, an)

    a, b = energies(cal, None), energies(other, None)
    assert a.keys() == b.keys() and len(a) == 2 * LAYERS  # out-projections and FFN down-projections
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    a, b = energies(cal, False), energies(other, False)
    assert any(not np.allclose(a[k], b[k], rtol=1e-3) for k in a)


def test_fisher_mask_gradient_is_the_gradient_of_an_input_mask():
    """``sum over W's output axis of W * dL/dW`` is ``dL/dm`` for a mask ``m`` on the input columns
    of ``Y = X W``, with ``L = r . Y`` for the first random projection ``r`` drawn from the seed."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    grads = mask_gradients(model, {"x": x}, {"w": 0}, seed=3)
    assert grads["w"].shape == (fisher_module.DRAWS, 5)  # one batch: all draws from it
    r = torch.randn((4, 2, 3), generator=torch.Generator().manual_seed(3)).numpy()
    expected = np.einsum("bsj,bso,jo->j", x, r, w)  # d/dm_j of sum(r * ((x * m) @ w)) at m = 1
    np.testing.assert_allclose(grads["w"][0], expected, rtol=1e-4, atol=1e-5)


def test_fisher_from_the_cli(encoder, data, tmp_path):
    """``prune --criterion fisher --calibrate npz:...``: whole heads scored on the data; the chosen
    model is then calibrated as with any criterion."""
    cal, _ = data
    np.savez(tmp_path / "cal.npz", **cal)
    out = tmp_path / "half.onnx"
    code, stdout, err = run_cli("prune", encoder, "-o", out, "--structured", "--ratio", "0.5", "--criterion", "fisher",
                                "--calibrate", f"npz:{tmp_path / 'cal.npz'}", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["criterion"] == "fisher" and s["calibration"]["mask"] == "attention_mask"
    assert {g["total"]: g["kept"] for g in s["groups"]} == {HEADS: HEADS // 2, FFN: FFN // 2}
    assert run_ort(str(out), bert_feeds(2, 7))[0].shape == (2, D)


def test_fisher_needs_calibration_data(encoder):
    code, _, err = run_cli("prune", encoder, "-o", encoder.with_name("x.onnx"), "--structured", "--ratio", "0.5",
                           "--criterion", "fisher")
    assert code != 0 and "needs calibration data" in err and "Traceback" not in err
    assert not encoder.with_name("x.onnx").exists()


def test_rearrangement_removes_channels_whose_effects_cancel_together():
    """Kwon et al.'s rearrangement: channel 1 moves the output against channel 0, so once 0 is
    removed, removing 1 too undoes most of it, though 1 alone costs more than 2 alone; the diagonal
    removes 0 and 2, the rearrangement 0 and 1 (the count kept)."""
    from onnxprune.structured.rearrange import rearranged
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(400), rng.standard_normal(400)
    p = np.stack([a, -1.2 * a, 1.1 * b, 3.0 * rng.standard_normal(400)], axis=1)
    diag = np.square(p).sum(0)
    assert set(np.argsort(diag)[:2]) == {0, 2}  # the diagonal would remove 0 and 2
    assert rearranged(p, 2).tolist() == [2, 3]
    cost = lambda removed: float(np.square(p[:, removed].sum(1)).sum())
    assert cost([0, 1]) < 0.1 * cost([0, 2])
    assert rearranged(p, 4).tolist() == [0, 1, 2, 3] and rearranged(p, 0).tolist() == []
    # with no interactions it is the diagonal choice
    q = np.stack([a, 1.2 * b, 1.1 * rng.standard_normal(400), 3.0 * rng.standard_normal(400)], axis=1)
    assert rearranged(q, 2).tolist() == sorted(np.argsort(np.square(q).sum(0))[2:].tolist())


def test_mask_rearrangement_keeps_the_counts_and_says_what_it_changed(encoder, data, tmp_path):
    cal, held_out = data
    np.savez(tmp_path / "cal.npz", **cal)
    runs = {}
    for extra in ((), ("--mask-rearrangement",)):
        out = tmp_path / f"m{len(extra)}.onnx"
        code, stdout, err = run_cli("prune", encoder, "-o", out, "--structured", "--ratio", "0.5", "--criterion", "fisher",
                                    "--calibrate", f"npz:{tmp_path / 'cal.npz'}", "--input-shape", f"input_ids=1x{SEQ}",
                                    "--input-shape", f"attention_mask=1x{SEQ}", "--json", *extra)
        assert code == 0, err
        runs[extra] = json.loads(stdout)
    off, on = runs[()], runs[("--mask-rearrangement",)]
    assert off["mask_rearrangement"] == {"enabled": False, "groups_changed": []}
    assert on["mask_rearrangement"]["enabled"] and on["mask_rearrangement"]["groups_changed"]
    assert on["macs_after"] == off["macs_after"] and on["groups"] == off["groups"]
    code, _, err = run_cli("prune", encoder, "-o", tmp_path / "x.onnx", "--structured", "--ratio", "0.5",
                           "--mask-rearrangement")
    assert code == 1 and "needs --criterion fisher" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
