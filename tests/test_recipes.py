"""Recipe schema, loader, --set overrides and the shipped recipes."""
from __future__ import annotations

import pytest

from onnxprune.core.errors import OnnxPruneError
from onnxprune.pipeline.sweep import expand
from onnxprune.recipes import load_recipe, shipped_recipes
from onnxprune.recipes.schema import Target

SHIPPED = ["global-magnitude-mt", "structured-l1-2x-macs", "agp-structured", "nm-2-4-tensorrt", "sensitivity",
           "shrinkbench-sweep", "demo"]


def _write(tmp_path, text: str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_and_expands(name):
    assert name in shipped_recipes()
    r = load_recipe(name)
    plan = expand(r)
    assert plan.runs or r.sensitivity.enabled
    assert len({x.id for x in plan.runs}) == len(plan.runs)


def test_shipped_recipes_say_what_they_promise():
    assert load_recipe("structured-l1-2x-macs").stages[0].target == Target(macs=0.5)
    agp = load_recipe("agp-structured")
    assert agp.schedule.kind == "agp" and agp.schedule.steps > 1 and agp.stages[0].kind == "structured"
    nm = load_recipe("nm-2-4-tensorrt")
    assert (nm.stages[0].kind, nm.stages[0].n, nm.stages[0].m) == ("nm", 2, 4) and nm.hw == ["nvidia-tensorrt-fp16"]
    mt = load_recipe("global-magnitude-mt").stages[0]
    assert mt.scope == "global" and mt.min_threshold and mt.min_threshold > 0
    sb = load_recipe("shrinkbench-sweep")
    assert [p.compression for p in sb.sweep.points] == [1, 2, 4, 8, 16, 32]
    assert {m.stages[0].criterion for m in sb.sweep.methods} == {"random", "magnitude"}
    assert {m.stages[0].scope for m in sb.sweep.methods} == {"global", "layer"}
    assert len(sb.sweep.seeds) >= 2
    assert len(expand(sb).runs) == 6 * 3 * len(sb.sweep.seeds)
    demo = load_recipe("demo")
    kinds = [m.stages[0].kind for m in demo.methods()]
    assert sorted(kinds) == ["structured", "unstructured"]
    assert all(len(demo.points_of(m)) == 2 for m in demo.methods())
    assert demo.retrain.epochs > 0 and demo.hw == ["ci-cpu"]
    sens = load_recipe("sensitivity")
    assert sens.sensitivity.enabled and sens.stages[0].per_layer == "sensitivity"


def test_typo_names_file_and_field(tmp_path):
    p = _write(tmp_path, "stages:\n  - kind: structured\n    target: {macs: 0.5}\nretrain: {epoch: 3}\n")
    with pytest.raises(OnnxPruneError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "r.yaml" in msg and "retrain.epoch" in msg and "epochs" in msg and "\n" not in msg


@pytest.mark.parametrize("body, field, expected", [
    ("stages:\n  - kind: structured\n    criterion: l3\n    target: {macs: 0.5}\n", "stages.0.criterion", "l1"),
    ("stages:\n  - kind: structured\n    target: {macs: 1.5}\n", "stages.0.target.macs", "less than or equal to 1"),
    ("stages:\n  - kind: structured\n    target: {macs: 0.5, ratio: 0.2}\n", "stages.0.target", "exactly one"),
    ("stages:\n  - kind: pruned\n    target: {macs: 0.5}\n", "stages.0.kind", "structured"),
    ("stages:\n  - {kind: nm, n: 4, m: 2}\n", "stages.0", "n < m"),
    ("stages:\n  - kind: unstructured\n", "recipe", "no target"),
    ("schedule: {kind: one-shot, steps: 3}\nstages:\n  - {kind: structured, target: {ratio: 0.3}}\n", "schedule", "one-shot"),
    ("retrain: {epochs: 1, feature_weight: -1}\nstages:\n  - {kind: structured, target: {ratio: 0.3}}\n",
     "retrain.feature_weight", "greater than or equal to 0"),
])
def test_bad_values_name_the_field(tmp_path, body, field, expected):
    with pytest.raises(OnnxPruneError) as e:
        load_recipe(_write(tmp_path, body))
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "r.yaml")) or "r.yaml" in msg
    assert field in msg and expected in msg, msg


def test_retrain_distill_features_reach_the_train_config(tmp_path):
    """``retrain.distill_features`` / ``feature_weight`` are finetune's ``--distill-features`` /
    ``--feature-weight``: the run's TrainConfig carries them."""
    from onnxprune.pipeline.steps import train_config
    body = ("retrain: {epochs: 1, distillation: true, distill_features: true, feature_weight: 2.5}\n"
            "stages:\n  - {kind: structured, target: {ratio: 0.3}}\n")
    cfg = train_config(load_recipe(_write(tmp_path, body)).retrain.train_config_dict(0))
    assert cfg.distill_features and cfg.feature_weight == 2.5


def test_invalid_yaml_and_unknown_recipe(tmp_path):
    with pytest.raises(OnnxPruneError, match=r"invalid YAML at line 2"):
        load_recipe(_write(tmp_path, "stages: [\n"))
    with pytest.raises(OnnxPruneError, match=r"not a shipped recipe \(shipped: .*demo"):
        load_recipe("no-such-recipe")
    with pytest.raises(OnnxPruneError, match="top level"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))


def test_set_overrides():
    r = load_recipe("demo", ["retrain.epochs=3", "sweep.seeds=[0,1]", "hw=[x86-server-cpu]", "retrain.lr=0.5"])
    assert r.retrain.epochs == 3 and r.sweep.seeds == [0, 1] and r.hw == ["x86-server-cpu"] and r.retrain.lr == 0.5
    # a shorthand method addressed in either form
    assert load_recipe("demo", ["sweep.methods.0.criterion=l2"]).methods()[0].stages[0].criterion == "l2"
    assert load_recipe("demo", ["sweep.methods.0.stages.0.criterion=l2"]).methods()[0].stages[0].criterion == "l2"
    # a data spec string addressed as a mapping
    assert load_recipe("demo", ["data.spec=digits?val=0.1"]).data == {"spec": "digits?val=0.1"}
    # seeds multiply the runs
    assert len(expand(load_recipe("demo", ["sweep.seeds=[0,1,2]"])).runs) == 12


@pytest.mark.parametrize("item, expected", [
    ("retrain.epoch=3", "unknown key 'retrain.epoch'"),
    ("foo.bar=1", "unknown key 'foo'"),
    ("retrain", "expected KEY=VALUE"),
    ("retrain.epochs=many", "field 'retrain.epochs'"),
    ("sweep.methods.9.criterion=l1", "index 9 out of range"),
    ("sweep.methods.1.criterion=l1", "not a criterion of kind unstructured"),
])
def test_set_errors(item, expected):
    with pytest.raises(OnnxPruneError) as e:
        load_recipe("demo", [item])
    assert expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_target_labels_and_defaults():
    assert Target(macs=0.5).label() == "macs0.5"
    assert Target(compression=4).label() == "c4"
    r = load_recipe("shrinkbench-sweep")
    assert [x.point for x in expand(r).runs][:3] == ["c1", "c1", "c1"]
