"""Importance criteria one by one, on hand-built groups with hand-computed expectations."""
from __future__ import annotations

import numpy as np
import pytest

from onnxprune.channels.types import Group, Member
from onnxprune.core.errors import OnnxPruneError
from onnxprune.structured.importance import (IMPORTANCE, CriterionUnavailable, ScoreInputs, aggregate, lamp_transform,
                                             score_groups)

ID3 = ((0,), (1,), (2,))
W1 = np.array([[1.0, -1.0], [2.0, 0.0], [0.0, 0.5]])  # producer conv, out channels on axis 0
GAMMA = np.array([1.0, -3.0, 2.0])
BETA = np.array([100.0, -50.0, 7.0])  # never scored: biases carry no magnitude signal
W2 = np.array([[1.0, 0.0, 2.0]] * 4)  # consumer, in channels on axis 1: column L1 = 4, 0, 8


def _group(with_bn: bool = True) -> tuple[Group, ScoreInputs]:
    members = [Member("w1", 0, ID3, "out", "conv1"), Member("y1", 1, ID3, "act", "conv1"),
               Member("w2", 1, ID3, "in", "gemm2")]
    arrays = {"w1": W1, "w2": W2}
    ops, inputs = {"conv1": "Conv", "gemm2": "Gemm"}, {"conv1": ["x", "w1"], "gemm2": ["y1", "w2"]}
    if with_bn:
        members += [Member("gamma", 0, ID3, "param", "bn1"), Member("beta", 0, ID3, "param", "bn1")]
        arrays.update(gamma=GAMMA, beta=BETA)
        ops["bn1"] = "BatchNormalization"
        inputs["bn1"] = ["y0", "gamma", "beta", "mean", "var"]
    return Group(id=7, size=3, members=members, nodes=list(ops)), ScoreInputs(arrays.get, ops, inputs)


def test_l1_aggregates_mean_normalized_members():
    g, inp = _group()
    out = [2 / 1.5, 2 / 1.5, 0.5 / 1.5]  # |w1| row sums 2, 2, 0.5
    bn = [1 / 2, 3 / 2, 2 / 2]  # |gamma| 1, 3, 2
    cons = [4 / 4, 0 / 4, 8 / 4]  # |w2| column sums 4, 0, 8
    np.testing.assert_allclose(IMPORTANCE["l1"](g, inp), np.mean([out, bn, cons], axis=0))


def test_l2_uses_euclidean_norms():
    g, inp = _group()
    out = np.array([np.sqrt(2), 2.0, 0.5])
    cons = np.array([2.0, 0.0, 4.0])  # sqrt(4 * 1), 0, sqrt(4 * 4)
    gam = np.abs(GAMMA)
    expect = np.mean([out / out.mean(), gam / gam.mean(), cons / cons.mean()], axis=0)
    np.testing.assert_allclose(IMPORTANCE["l2"](g, inp), expect)


def test_bn_is_abs_gamma_and_unavailable_without_bn():
    g, inp = _group()
    np.testing.assert_allclose(IMPORTANCE["bn"](g, inp), [0.5, 1.5, 1.0])
    g2, inp2 = _group(with_bn=False)
    with pytest.raises(CriterionUnavailable, match="no BatchNormalization"):
        IMPORTANCE["bn"](g2, inp2)


def test_fpgm_sums_distances_between_out_filters():
    g, inp = _group()
    d01, d02, d12 = np.sqrt(2), np.sqrt(1 + 1.5 ** 2), np.sqrt(4 + 0.25)
    s = np.array([d01 + d02, d01 + d12, d02 + d12])
    np.testing.assert_allclose(IMPORTANCE["fpgm"](g, inp), s / s.mean())


def test_lamp_transform_and_criterion():
    # ascending 1, 2, 3, 4: 1/10, 2/9, 3/7, 4/4 (order of the input kept)
    np.testing.assert_allclose(lamp_transform(np.array([3.0, 1.0, 4.0, 2.0])), [3 / 7, 1 / 10, 1.0, 2 / 9])
    g, inp = _group()
    l2 = IMPORTANCE["l2"](g, inp)
    np.testing.assert_allclose(IMPORTANCE["lamp"](g, inp), lamp_transform(l2 ** 2))
    assert IMPORTANCE["lamp"](g, inp).max() == pytest.approx(1.0)


def test_random_is_seeded_per_group():
    g, inp = _group()
    a = IMPORTANCE["random"](g, inp)
    np.testing.assert_array_equal(a, np.random.default_rng([0, 7]).random(3))
    np.testing.assert_array_equal(a, IMPORTANCE["random"](g, inp))
    other = ScoreInputs(inp.const, inp.ops, inp.node_inputs, seed=1)
    assert not np.array_equal(a, IMPORTANCE["random"](g, other))


def test_taylor_needs_gradients_and_scores_abs_sum_w_times_g():
    g, inp = _group()
    with pytest.raises(OnnxPruneError, match="criterion taylor needs --data"):
        IMPORTANCE["taylor"](g, inp)
    grads = {"w1": np.ones_like(W1), "w2": np.full_like(W2, -1.0)}
    with_g = ScoreInputs(inp.const, inp.ops, inp.node_inputs, gradients=grads)
    out = np.abs(W1.sum(1))  # |sum w * 1| per row: 0, 2, 0.5
    cons = np.abs(-W2.sum(0))  # 4, 0, 8
    np.testing.assert_allclose(IMPORTANCE["taylor"](g, with_g), np.mean([out / out.mean(), cons / cons.mean()], axis=0))
    with pytest.raises(CriterionUnavailable):
        IMPORTANCE["taylor"](g, ScoreInputs(inp.const, inp.ops, inp.node_inputs, gradients={}))


def test_flatten_expansion_and_conv_axes():
    """A channel spanning several positions (Flatten: channel -> C*H*W block) sums over all of them;
    4-D conv weights are read along their member axis."""
    conv = np.zeros((2, 3, 1, 1))
    conv[0, :, 0, 0] = [1, 2, 3]  # out channel 0 of the conv: L1 6
    conv[1, :, 0, 0] = [0, 0, 2]  # out channel 1: L1 2
    fc = np.arange(12, dtype=float).reshape(4, 3)  # Gemm weight [K=4, N=3]: rows 0,1 are channel 0, rows 2,3 channel 1
    members = [Member("c", 0, ((0,), (1,)), "out", "conv"), Member("f", 0, ((0, 1), (2, 3)), "in", "fc")]
    g = Group(id=0, size=2, members=members)
    inp = ScoreInputs({"c": conv, "f": fc}.get)
    conv_s = np.array([6.0, 2.0])
    fc_s = np.array([fc[:2].sum(), fc[2:].sum()])
    np.testing.assert_allclose(IMPORTANCE["l1"](g, inp), np.mean([conv_s / conv_s.mean(), fc_s / fc_s.mean()], axis=0))
    # FPGM on the filters of the conv only (the "out" member); two filters are equally far apart
    np.testing.assert_allclose(IMPORTANCE["fpgm"](g, inp), [1.0, 1.0])


def test_all_zero_member_is_skipped_and_unscorable_group_reported():
    assert aggregate([(np.zeros(3), None), (np.array([1.0, 2.0, 3.0]), None)], 3).tolist() == [0.5, 1.0, 1.5]
    act_only = Group(id=1, size=2, members=[Member("x", 1, ((0,), (1,)), "act", "relu")])
    scores, unavailable = score_groups([act_only, _group()[0]], "l1", _group()[1])
    assert list(scores) == [7] and 1 in unavailable
    with pytest.raises(OnnxPruneError, match="unknown criterion"):
        score_groups([], "nope", _group()[1])


def test_grouped_conv_input_member_reads_each_block_of_filters():
    """Grouped Conv weight [O=4, C/g=2, 1, 1] with g=2 read on axis 1: channel p of block j is
    column p - 2j of the filters of block j only."""
    w = np.arange(8, dtype=float).reshape(4, 2, 1, 1) + 1  # filters 0,1 read channels 0,1; filters 2,3 read 2,3
    m = Member("w", 1, ((0,), (1,), (2,), (3,)), "in", "gconv", groups=2)
    g = Group(id=0, size=4, members=[m], blocks=2)
    s = np.array([1 + 3, 2 + 4, 5 + 7, 6 + 8], dtype=float)  # L1 over the filters of the channel's block
    np.testing.assert_allclose(IMPORTANCE["l1"](g, ScoreInputs({"w": w}.get)), s / s.mean())


def test_member_holding_a_window_is_normalized_over_it():
    """A Split output's consumer holds channels 2 and 3 only: it is normalized over those two and
    averaged into them alone, so channels 0 and 1 are not penalized for being outside it."""
    w_out = np.array([[1.0], [2.0], [3.0], [4.0]])  # L1 1..4, mean 2.5
    w_in = np.array([[1.0, 3.0]])  # consumer [1, 2] reading channels 2, 3: L1 1, 3 (mean 2)
    members = [Member("wo", 0, ((0,), (1,), (2,), (3,)), "out", "conv"),
               Member("wi", 1, ((), (), (0,), (1,)), "in", "branch")]
    g = Group(id=0, size=4, members=members)
    inp = ScoreInputs({"wo": w_out, "wi": w_in}.get)
    np.testing.assert_allclose(IMPORTANCE["l1"](g, inp), [0.4, 0.8, (1.2 + 0.5) / 2, (1.6 + 1.5) / 2])
    fp = IMPORTANCE["fpgm"](g, inp)  # filters 1..4 on a line: summed distances 6, 4, 4, 6 (mean 5)
    np.testing.assert_allclose(fp, [1.2, 0.8, 0.8, 1.2])
