"""Latency-aware allocation (issue 14): knapsack on synthetic tables, table cache, CLI end to end.

No timing assertions: latency is measured only to run the code paths, on tiny models.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import zoo
from cli_util import run_cli
from conftest import random_feeds, run_ort
from onnxprune.structured.allocate import Limits
from onnxprune.structured.latency_alloc import Choice, knapsack, valid_counts
from onnxprune.structured.latency_table import LatencyTable, Layer, line_fit


def _additive(ms_per_channel):
    """Synthetic table: group g costs ms_per_channel[g] per kept channel."""
    def latency(counts):
        return sum(ms_per_channel[g] * k for g, k in counts.items())

    def saving(counts, gid, new):
        return ms_per_channel[gid] * (counts[gid] - new)
    return latency, saving


def _choice(gid, size, step, importance_per_channel):
    counts = list(range(size, 0, -step))
    return Choice(gid, counts, [importance_per_channel * k for k in counts])


def test_knapsack_takes_the_cheapest_importance_per_ms_first():
    # group 0: slow and unimportant, group 1: fast and important; both 16 channels in steps of 4
    latency, saving = _additive({0: 1.0, 1: 0.1})
    choices = [_choice(0, 16, 4, 1.0), _choice(1, 16, 4, 5.0)]
    counts, est = knapsack(choices, latency, saving, budget=10.0)
    assert counts == {0: 8, 1: 16}  # 17.6 -> 9.6 ms by removing 8 cheap channels of group 0 only
    assert est == pytest.approx(latency(counts)) and est <= 10.0


def test_knapsack_stops_at_the_limits_when_the_budget_is_out_of_reach():
    latency, saving = _additive({0: 1.0, 1: 1.0})
    choices = [_choice(0, 8, 4, 1.0), _choice(1, 8, 4, 1.0)]
    counts, est = knapsack(choices, latency, saving, budget=0.5)
    assert counts == {0: 4, 1: 4} and est == pytest.approx(8.0)


def test_knapsack_ignores_steps_that_save_nothing():
    latency, saving = _additive({0: 0.0, 1: 1.0})
    counts, _ = knapsack([_choice(0, 8, 4, 0.001), _choice(1, 8, 4, 1.0)], latency, saving, budget=4.0)
    assert counts == {0: 8, 1: 4}  # group 0 is free to cut but cutting it buys no latency


def test_valid_counts_follow_round_to_and_limits():
    assert valid_counts(64, 1, Limits(max_ratio=0.9, round_to=8)) == [64, 56, 48, 40, 32, 24, 16, 8]
    assert valid_counts(20, 1, Limits(max_ratio=0.5, round_to=8)) == [20, 16]
    assert valid_counts(6, 1, Limits(max_ratio=0.5, round_to=8)) == [6, 5, 4, 3]  # no multiple of 8 fits


def test_curves_are_robust_lines_and_layers_separable():
    a, b = line_fit([(8, 1.0), (16, 2.0), (24, 3.0), (32, 40.0)])  # one pre-empted run at full width
    assert (a, b) == (pytest.approx(0.0), pytest.approx(0.125))
    assert line_fit([(8, 2.0), (16, 1.0)])[1] == 0.0  # never a negative slope
    layer = Layer("n", "Conv", out_full=16, in_full=16, out_parts=[(0, 1)], in_parts=[(1, 1)],
                  out_curve=[(8, 1.0), (16, 2.0)], in_curve=[(8, 0.5), (16, 2.0)])
    sizes = {0: 16, 1: 16}
    assert layer.dense_ms == pytest.approx(2.0) and layer.ms({}, sizes) == pytest.approx(2.0)
    assert layer.ms({0: 8, 1: 8}, sizes) == pytest.approx(1.0 * 0.5 / 2.0)  # separable out x in
    # layers timed alone add up to more than the whole model: savings are scaled to the whole
    table = LatencyTable("p", dense_ms=1.0, layers=[layer], sizes=sizes)
    assert table.scale == pytest.approx(0.5) and table.estimate({0: 8, 1: 8}) == pytest.approx(1.0 - 0.5 * 1.75)
    # ... and to less: the untimed rest (activations, adds) shrinks with the layers around it
    table = LatencyTable("p", dense_ms=4.0, layers=[layer], sizes=sizes)
    assert table.estimate({0: 8, 1: 8}) == pytest.approx(4.0 * (0.25 / 2.0))
    # MACs kept: out x in widths (a depthwise layer's in side is its out side)
    assert layer.kept_fraction({0: 8, 1: 4}, sizes) == pytest.approx(0.5 * 0.25)
    dw = Layer("d", "Conv", out_full=16, in_full=16, out_parts=[(0, 1)], depthwise=True)
    assert dw.kept_fraction({0: 4}, sizes) == pytest.approx(0.25)


def test_knapsack_penalty_buys_time_with_fewer_macs():
    # both groups save 1 ms per channel at equal importance; group 0's channels carry 4x the MACs
    latency, saving = _additive({0: 1.0, 1: 1.0})
    choices = [_choice(0, 16, 4, 1.0), _choice(1, 16, 4, 1.0)]
    macs = {0: 4.0, 1: 1.0}
    counts, _ = knapsack(choices, latency, saving, budget=24.0,
                         penalty=lambda c, gid, new: macs[gid] * (c[gid] - new))
    assert counts == {0: 16, 1: 8}
    assert knapsack(choices, latency, saving, budget=24.0)[0] == {0: 8, 1: 16}  # no penalty: a tie, the first group


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return zoo.export("tiny_resnet", tmp_path_factory.mktemp("halp"))


def test_table_is_cached_per_profile_and_model(tiny, tmp_path, monkeypatch):
    from onnxprune.channels.analyze import analyze_channels
    from onnxprune.prepare import prepare
    from onnxprune.profiling.hw_profile import load_hw_profile
    from onnxprune.structured import latency_table as lt

    prep = prepare(tiny)
    analysis = analyze_channels(prep.view)
    ids = [g.id for g in analysis.prunable]
    prof = load_hw_profile("ci-cpu")
    first = lt.latency_table(prep.view, analysis, ids, prof, tiny, input_shapes=prep.concrete_shapes, cache=tmp_path)
    assert not first.cached and first.layers and all(l.out_curve for l in first.layers)
    assert first.dense_ms > 0 and list(tmp_path.glob("ci-cpu-*.json")) == [type(tmp_path)(first.path)]

    def no_measuring(*a, **k):
        raise AssertionError("a cached table must not be measured again")
    monkeypatch.setattr(lt, "_measure_chunk", no_measuring)
    again = lt.latency_table(prep.view, analysis, ids, prof, tiny, input_shapes=prep.concrete_shapes, cache=tmp_path)
    assert again.cached and again.to_json()["layers"] == first.to_json()["layers"]
    other = prof.model_copy(update={"name": "other", "min_runs": 11})
    assert lt.table_key(prep.view, other, ids) != lt.table_key(prep.view, prof, ids)
    with pytest.raises(AssertionError, match="cached table"):
        lt.latency_table(prep.view, analysis, ids, other, tiny, input_shapes=prep.concrete_shapes, cache=tmp_path)


def test_cli_target_speedup_end_to_end(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "fast.onnx"
    before = tiny.read_bytes()
    code, stdout, err = run_cli("prune", tiny, "-o", out, "--structured", "--target-speedup", "1.2", "--hw", "ci-cpu",
                                "--json")
    assert code == 0, err
    s = json.loads(stdout)
    la = s["latency_allocation"]
    assert s["target"]["kind"] == "speedup" and s["target"]["value"] == 1.2
    assert la["profile"] == "ci-cpu" and la["timing"] == "interleaved" and 1 <= len(la["iterations"]) <= 3
    assert la["macs_weight"] == 4.0  # the default: MACs removed count beside importance lost
    assert isinstance(la["met"], bool) and 0 < la["importance_kept"] <= 1
    assert s["target"]["achieved"] == la["chosen"]["measured_speedup"]
    assert s["limits"]["round_to"] == 8  # ci-cpu's channel_multiple
    assert list((tmp_path / "cache" / "latency").glob("ci-cpu-*.json"))
    assert tiny.read_bytes() == before
    run_ort(out, random_feeds(onnx.load(str(out))))


@pytest.mark.parametrize("args, msg", [
    (["--target-speedup", "2"], "needs --hw PROFILE"),
    (["--target-speedup", "2", "--hw", "ort-cpu"], "needs --hw PROFILE"),
    (["--target-speedup", "0.5", "--hw", "ci-cpu"], "at least 1"),
    (["--target-latency", "-1", "--hw", "ci-cpu"], "positive number of milliseconds"),
    (["--target-latency", "1", "--ratio", "0.5", "--hw", "ci-cpu"], "exactly one of"),
    (["--target-latency", "1", "--hw", "ci-cpu", "--scope", "local"], "--scope does not apply"),
])
def test_cli_latency_target_errors(tiny, tmp_path, args, msg):
    out = tmp_path / "x.onnx"
    code, _, err = run_cli("prune", tiny, "-o", out, "--structured", *args)
    assert code == 1 and msg in err and "Traceback" not in err and not out.exists()


def test_next_budget_rescales_then_follows_the_secant():
    from onnxprune.structured.latency_alloc import next_budget

    assert next_budget([(0.5, 1.0)], 0.5) == pytest.approx(0.25)  # measured twice the estimate: ask half
    # measured = 0.4 + 0.6 * estimated: the secant lands on the estimate that measures 0.5
    hist = [(0.5, 0.7), (0.25, 0.55)]
    assert next_budget(hist, 0.5) == pytest.approx(1 / 6)
    assert next_budget([(0.5, 0.01)], 0.5) == 1.0  # bounded (and never above the dense model)
