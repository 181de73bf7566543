"""Allocation (counts, limits, blocks, ignore, local/global) and the target search, on hand-built groups."""
from __future__ import annotations

import numpy as np
import pytest

from onnxprune.channels.types import Group, Member
from onnxprune.core.errors import OnnxPruneError
from onnxprune.structured.allocate import Limits, allocate, final_count, ignored_groups, select
from onnxprune.structured.search import find_ratio


def _g(gid: int, size: int, blocks: int = 1, nodes=("n",)) -> Group:
    return Group(id=gid, size=size, members=[Member(f"w{gid}", 0, tuple((i,) for i in range(size)), "out", nodes[0])],
                 blocks=blocks, nodes=list(nodes))


def _kept(groups, scores, ratio, **kw):
    plan = allocate(groups, scores, ratio, **kw)
    return {gid: len(k) for gid, k in plan.items()}, plan


def _scores(*groups, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.size) for g in groups}


def test_local_same_ratio_floor_like_torch_pruning():
    gs = [_g(0, 10), _g(1, 16), _g(2, 3)]
    counts, plan = _kept(gs, _scores(*gs), 0.5)
    assert counts == {0: 5, 1: 8, 2: 1}
    # float noise: 10 * (1 - 0.7) = 2.9999999999999996 must keep 3, 10 * (1 - 0.3) keeps 7
    assert _kept(gs, _scores(*gs), 0.7)[0][0] == 3
    assert _kept(gs, _scores(*gs), 0.3)[0][0] == 7
    assert _kept(gs, _scores(*gs), 0.0)[0] == {0: 10, 1: 16, 2: 3}
    for gid, kept in plan.items():
        assert list(kept) == sorted(set(kept.tolist()))


def test_keeps_the_most_important():
    g = _g(0, 6)
    scores = {0: np.array([0.5, 9.0, 0.1, 3.0, 3.0, 7.0])}
    np.testing.assert_array_equal(allocate([g], scores, 0.5)[0], [1, 3, 5])  # tie 3.0/3.0 keeps the lower index


def test_max_ratio_and_min_keep():
    gs = [_g(0, 64), _g(1, 5), _g(2, 8), _g(3, 3)]
    counts = _kept(gs, _scores(*gs), 0.99, limits=Limits(max_ratio=0.9))[0]
    assert counts == {0: 7, 1: 1, 2: 1, 3: 1}  # ceil(64 * 0.1) = 7
    counts = _kept(gs, _scores(*gs), 0.9, limits=Limits(min_keep=4))[0]
    assert counts == {0: 7, 1: 4, 2: 4, 3: 3}  # a group smaller than min_keep stays whole


@pytest.mark.parametrize("scope", ["local", "global"])
def test_no_layer_collapse_at_extreme_ratios(scope):
    gs = [_g(0, 1), _g(1, 2), _g(2, 3), _g(3, 64), _g(4, 8, blocks=4)]
    scores = _scores(*gs)
    scores[3][:] = 0.0  # a dead layer: first in line under global ranking, still never emptied
    for ratio in (0.9, 0.99, 0.999):
        counts = _kept(gs, scores, ratio, scope=scope, limits=Limits(max_ratio=0.999))[0]
        assert all(c >= 1 for c in counts.values())
        assert counts[4] == 4  # one channel per block survives


def test_round_to():
    gs = [_g(0, 64), _g(1, 12), _g(2, 6)]
    lim = Limits(round_to=8)
    assert _kept(gs, _scores(*gs), 0.5, limits=lim)[0] == {0: 32, 1: 8, 2: 3}  # 6 -> 8; 3: no multiple of 8 fits
    assert _kept(gs, _scores(*gs), 0.55, limits=lim)[0][0] == 32  # 28 is halfway: keep more
    assert _kept(gs, _scores(*gs), 0.95, limits=Limits(round_to=8, max_ratio=0.95))[0][0] == 8  # never 0
    assert final_count(64, 30, 1, Limits(round_to=16, min_keep=20)) == 32  # never below min_keep
    assert final_count(64, 12, 1, Limits(round_to=16, min_keep=20)) == 32


def test_blocks_balance_removes_least_important_per_block():
    scores = np.array([5, 1, 3, 4, 0, 9, 8, 7, 2, 2, 6, 1], dtype=float)
    np.testing.assert_array_equal(select(scores, 6, blocks=3), [0, 3, 5, 6, 8, 10])
    g = _g(0, 12, blocks=3)
    counts = {r: len(allocate([g], {0: scores}, r)[0]) for r in (0.3, 0.5, 0.8)}
    assert counts == {0.3: 6, 0.5: 6, 0.8: 3}  # per block floor(4 * (1 - r)) as torch-pruning
    assert final_count(12, 7, 3, Limits()) % 3 == 0
    assert len(allocate([g], {0: scores}, 0.5, scope="global")[0]) % 3 == 0


def test_global_normalizes_per_group():
    small, big = _g(0, 4), _g(1, 4)
    scores = {0: np.array([1.0, 2.0, 3.0, 4.0]), 1: np.array([100.0, 200.0, 300.0, 400.0])}
    counts, plan = _kept([small, big], scores, 0.5, scope="global")
    assert counts == {0: 2, 1: 2}  # raw magnitudes would have emptied the small layer
    np.testing.assert_array_equal(plan[0], [2, 3])
    skew = {0: np.array([0.1, 0.2, 3.0, 4.0]), 1: np.array([1.0, 1.0, 1.0, 1.0])}
    counts = _kept([small, big], skew, 0.25, scope="global")[0]
    assert counts == {0: 2, 1: 4}
    assert sum(_kept([small, big], skew, 0.5, scope="global")[0].values()) == 4


def test_ignore_globs_over_node_names():
    gs = [_g(0, 4, nodes=("layer1.conv", "layer1.bn")), _g(1, 4, nodes=("layer2.conv",)), _g(2, 4, nodes=("head",))]
    out = ignored_groups(gs, ["layer1.*", "he?d"])
    assert set(out) == {0, 2} and "layer1.*" in out[0]
    assert ignored_groups(gs, []) == {}


def test_bad_arguments():
    g = [_g(0, 4)]
    for bad in (-0.1, 1.0):
        with pytest.raises(OnnxPruneError, match="ratio"):
            allocate(g, _scores(*g), bad)
    with pytest.raises(OnnxPruneError, match="scope"):
        allocate(g, _scores(*g), 0.5, scope="everywhere")
    for kw in ({"round_to": 0}, {"min_keep": 0}, {"max_ratio": 1.0}):
        with pytest.raises(OnnxPruneError):
            Limits(**kw)


def _cost_model(groups):
    """Quadratic 'MACs' over a chain: consecutive groups multiply (like conv in x out channels)."""
    total = {g.id: g.size for g in groups}

    def measure(plan):
        kept = [len(plan[g.id]) for g in groups]
        return sum(a * b for a, b in zip(kept, kept[1:])) / sum(total[a.id] * total[b.id] for a, b in zip(groups, groups[1:]))
    return measure


def test_search_hits_target_within_one_channel_step():
    gs = [_g(0, 16), _g(1, 32), _g(2, 64), _g(3, 64)]
    scores = _scores(*gs)
    measure = _cost_model(gs)

    def plan_for(r):
        return allocate(gs, scores, r)
    for target in (0.5, 0.25, 0.8):
        res = find_ratio(plan_for, measure, target, 0.9)
        assert res.achieved <= target
        assert res.achieved == pytest.approx(measure(res.plan))
        # bisection brackets the ratio to 1e-4, finer than one channel of these groups: a hair less pruning
        # (the next larger model) misses the target, so the result is the largest model that meets it
        assert measure(plan_for(res.ratio - 2e-4)) > target
    assert find_ratio(plan_for, measure, 1.0, 0.9).ratio == 0.0


def test_search_gives_back_channels_a_coarse_step_cut_too_many():
    """Two 4-head groups: one ratio step takes both from 2 heads to 1 (0.504 of the cost -> 0.254),
    so the ratio alone lands far under a 0.5 target; giving one group its second head back keeps
    0.379, still under it, and the search returns that."""
    gs = [_g(0, 4), _g(1, 4)]
    scores = _scores(*gs)

    def measure(plan):
        return (len(plan[0]) + len(plan[1])) / 8 + 0.004

    res = find_ratio(lambda r: allocate(gs, scores, r), measure, 0.5, 0.9)
    assert sorted(len(k) for k in res.plan.values()) == [1, 2]
    assert res.achieved == pytest.approx(3 / 8 + 0.004) and res.achieved == pytest.approx(measure(res.plan))


def test_search_unreachable_and_bad_targets():
    gs = [_g(0, 16), _g(1, 16)]
    scores = _scores(*gs)
    measure = _cost_model(gs)
    with pytest.raises(OnnxPruneError, match="unreachable"):
        find_ratio(lambda r: allocate(gs, scores, r, limits=Limits(max_ratio=0.5)), measure, 0.1, 0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(OnnxPruneError, match="target"):
            find_ratio(lambda r: allocate(gs, scores, r), measure, bad, 0.9)


def test_split_windows_never_empty():
    """A Split hands channels 0-3 and 4-7 to different branches: even when every channel of one
    half is the least important, each half keeps channels (within max_ratio)."""
    pos = tuple((i,) for i in range(8))
    members = [Member("w", 0, pos, "out", "conv"),
               Member("half0", 1, tuple((i,) if i < 4 else () for i in range(8)), "act", "split"),
               Member("half1", 1, tuple((i - 4,) if i >= 4 else () for i in range(8)), "act", "split")]
    g = Group(id=0, size=8, members=members)
    scores = {0: np.array([1, 2, 3, 4, 0.1, 0.2, 0.3, 0.4])}
    np.testing.assert_array_equal(allocate([g], scores, 0.5)[0], [1, 2, 3, 7])  # 7: the best of the weak half
    kept = allocate([g], scores, 0.5, limits=Limits(max_ratio=0.5))[0]
    assert len(np.intersect1d(kept, [4, 5, 6, 7])) == 2  # at most half of a window goes
    for ratio, scope in ((0.5, "local"), (0.9, "local"), (0.9, "global")):
        kept = allocate([g], scores, ratio, scope=scope, limits=Limits(max_ratio=0.99))[0]
        assert np.intersect1d(kept, [4, 5, 6, 7]).size >= 1 and np.intersect1d(kept, [0, 1, 2, 3]).size >= 1
