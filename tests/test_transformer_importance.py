"""Head and FFN importance from data (issue 21.4): ``--criterion activation`` scores a head by the
variance its ``head_dim`` columns put through the output projection on calibration tokens (FLAP's
fluctuation metric, ``Var(x_j) * ||W_out[:, j]||^2`` summed over the head's columns; an FFN column
by its own), padding tokens left out; heads go whole.

Shown on a BERT-style encoder trained in the test: at the same MACs, with no calibration re-fit, the
data-aware criterion keeps the dense embedding better than l1 on the weights alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_ort
from transformer_models import BertLike, export_bert, sequence_task, train_bert
from onnxprune.calibration import StructuredCalibration
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


def test_activation_keeps_the_dense_output_better_than_l1(encoder, data):
    """Half of every head group and FFN (the same MACs either way), no re-fit: the activation-aware
    scores move the embedding clearly less than l1 on the weights."""
    cal, held_out = data
    res = {}
    for crit in ("l1", "activation"):
        r = prune_structured(str(encoder), ratio=0.5, criterion=crit, input_shapes=SHAPES,
                             calibration=StructuredCalibration(cal, method="none"))
        assert r.summary["calibration"]["method"] == "none"  # nothing re-fitted: the choice alone
        res[crit] = (r.summary["macs_after"], *_fidelity(r.model, encoder, held_out))
        kept = {g["total"]: g["kept"] for g in r.summary["groups"]}
        assert kept == {HEADS: HEADS // 2, FFN: FFN // 2}
    assert res["l1"][0] == res["activation"][0]  # same MACs
    (_, rel_l1, cos_l1), (_, rel_act, cos_act) = res["l1"], res["activation"]
    assert rel_act < 0.9 * rel_l1, res
    assert cos_act > cos_l1, res


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
