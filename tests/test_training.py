"""Retraining: config, schedules, losses, the loop, finetune through the bridge, gradients, gradual
pruning, DDP on CPU (gloo, 2 processes) and the PyTorch-source path."""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
nn = torch.nn

from cli_util import run_cli  # noqa: E402
from onnxprune.datasets import DatasetSplits, Split, evaluate_onnx, load_dataset  # noqa: E402
from onnxprune.core.errors import OnnxPruneError  # noqa: E402
from onnxprune.bridge.torch_export import export_torch  # noqa: E402
from onnxprune.training import TrainConfig  # noqa: E402
from onnxprune.training.distill import distillation_loss, training_loss  # noqa: E402
from onnxprune.training.gradual import agp_schedule, linear_schedule  # noqa: E402
from onnxprune.training.loop import train_module  # noqa: E402
from onnxprune.training.schedules import cosine_factor, lr_at, step_factor  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster (and reproducibly) on one thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class SmallCNN(nn.Module):
    def __init__(self, c1=6, c2=8):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU())
        self.h = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, 10))

    def forward(self, x):
        return self.h(self.f(x))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory, digits):
    """A SmallCNN trained 3 epochs on digits, exported (BatchNormalization kept)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = SmallCNN()
    train_module(m, digits, TrainConfig(epochs=3, lr=0.05), progress=False)
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    export_torch(m, (torch.zeros(1, 1, 8, 8),), path)
    return path


# --------------------------------------------------------------------------- config and schedules

def test_config_round_trip_and_validation():
    c = TrainConfig(epochs=3, lr=0.1, schedule="step", optimizer="adamw", label_smoothing=0.1)
    d = c.to_dict()
    json.dumps(d)
    assert TrainConfig.from_dict(d) == c and d["step_milestones"] == [0.5, 0.75]
    assert c.replace(lr=None, epochs=5).epochs == 5
    for bad in (dict(epochs=-1), dict(lr=0), dict(schedule="poly"), dict(optimizer="adam"), dict(label_smoothing=1.0),
                dict(distill_alpha=1.5), dict(batch_size=0), dict(step_milestones=(1.5,)), dict(lr=float("nan"))):
        with pytest.raises(OnnxPruneError, match="training config"):
            TrainConfig(**bad)
    with pytest.raises(OnnxPruneError, match="unknown key"):
        TrainConfig.from_dict({"epoch": 3})


def test_cosine_schedule_values():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(2.5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # warm-up: linear up to the peak, then the cosine over the remaining epochs
    assert cosine_factor(0.5, 10, warmup=1) == pytest.approx(0.5)
    assert cosine_factor(1, 10, warmup=1) == pytest.approx(1.0)
    assert cosine_factor(5.5, 10, warmup=1) == pytest.approx(0.5)
    c = TrainConfig(epochs=4, lr=0.2)
    vals = [lr_at(c, t / 4) for t in range(17)]
    assert vals[0] == pytest.approx(0.2) and all(a >= b for a, b in zip(vals, vals[1:]))


def test_step_schedule_values():
    f = [step_factor(e, 8) for e in range(8)]
    assert f == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert step_factor(3.99, 8) == 1.0 and step_factor(4.0, 8) == pytest.approx(0.1)
    c = TrainConfig(epochs=10, lr=0.5, schedule="step", step_milestones=(0.3,), step_gamma=0.5)
    assert [lr_at(c, e) for e in (0, 2.9, 3, 9)] == pytest.approx([0.5, 0.5, 0.25, 0.25])
    assert lr_at(TrainConfig(schedule="constant", lr=0.3, epochs=5), 4.5) == pytest.approx(0.3)


def test_agp_schedule_formula_endpoints_monotonic():
    s = agp_schedule(0.0, 0.9, 5)
    assert len(s) == 5 and s[-1] == pytest.approx(0.9)
    assert s == pytest.approx([0.9 + (0.0 - 0.9) * (1 - t / 5) ** 3 for t in range(1, 6)])
    assert all(a < b for a, b in zip(s, s[1:]))
    steps = np.diff([0.0] + s)
    assert all(a > b for a, b in zip(steps, steps[1:]))  # large steps first
    assert agp_schedule(0.5, 0.8, 1) == pytest.approx([0.8])
    assert agp_schedule(0.2, 0.2, 3) == pytest.approx([0.2, 0.2, 0.2])
    assert linear_schedule(0.0, 0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    for bad in ((0.0, 0.9, 0), (0.5, 0.4, 3), (0.0, 1.0, 3), (-0.1, 0.5, 2)):
        with pytest.raises(OnnxPruneError):
            agp_schedule(*bad)


# --------------------------------------------------------------------------- losses

def test_distillation_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    T = 3.0
    p_t = torch.softmax(t / T, 1)
    ref = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert float(distillation_loss(s, t, T)) == pytest.approx(float(ref), rel=1e-5)
    assert float(distillation_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    y = torch.randint(0, 7, (5,), generator=g)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert float(training_loss(s, y)) == pytest.approx(float(ce))
    assert float(training_loss(s, y, teacher_logits=t, alpha=0.0)) == pytest.approx(float(ce))
    mixed = training_loss(s, y, teacher_logits=t, alpha=0.25, temperature=T)
    assert float(mixed) == pytest.approx(0.75 * float(ce) + 0.25 * float(ref), rel=1e-5)


def test_label_smoothing_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    s, y = torch.randn(4, 5, generator=g), torch.tensor([0, 3, 1, 4])
    eps, k = 0.2, 5
    logp = torch.log_softmax(s, 1)
    target = torch.full((4, 5), eps / k)
    target[torch.arange(4), y] += 1 - eps
    ref = -(target * logp).sum(1).mean()
    assert float(training_loss(s, y, label_smoothing=eps)) == pytest.approx(float(ref), rel=1e-6)


# --------------------------------------------------------------------------- the loop on a plain module

def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_train_module_is_deterministic_and_learns(digits):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = SmallCNN()
        h = train_module(m, digits, TrainConfig(epochs=2, lr=0.05, seed=3), progress=False)
        runs.append((_weights(m), h))
    (w1, h1), (w2, h2) = runs
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [e["train_loss"] for e in h1["epochs"]] == [e["train_loss"] for e in h2["epochs"]]
    assert h1["best_val_top1"] > 0.5 and h1["config"]["seed"] == 3 and len(h1["epochs"]) == 2
    assert set(h1["epochs"][0]) == {"epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1"}


class _Forbidden(Split):
    """A test split that fails the test if anything reads it."""

    def batches(self, *a, **k):
        raise AssertionError("the training loop read the test split")


def test_checkpoint_is_chosen_on_validation_only(digits):
    """Validation labels follow another rule than training ones: training makes validation worse, so
    the loop must return the best-on-validation weights (here: the untrained start), and never read test."""
    wrong_val = Split(x=digits.val.x, y=(digits.val.y + 1) % 10)
    ds = DatasetSplits(train=digits.train, val=wrong_val, test=_Forbidden(x=digits.test.x, y=digits.test.y),
                       num_classes=10, input_shape=(1, 8, 8))
    torch.manual_seed(0)
    m = SmallCNN()
    start = _weights(m)
    h = train_module(m, ds, TrainConfig(epochs=3, lr=0.05), progress=False)
    vals = [h["initial_val_top1"]] + [e["val_top1"] for e in h["epochs"]]
    assert h["best_val_top1"] == max(vals) == vals[h["best_epoch"]]
    from onnxprune.training.loop import evaluate_module
    assert evaluate_module(m, ds, "val")["top1"] == pytest.approx(max(vals))
    if h["best_epoch"] == 0:
        assert all(torch.equal(start[k], v) for k, v in _weights(m).items())


def test_train_module_with_masks_hook_and_adamw_step_schedule(digits):
    torch.manual_seed(0)
    m = SmallCNN()
    w = m.f[4].weight
    mask = torch.rand(w.shape) > 0.7
    with torch.no_grad():
        w.mul_(mask)

    def enforce():
        with torch.no_grad():
            w.mul_(mask)

    h = train_module(m, digits, TrainConfig(epochs=2, lr=0.01, optimizer="adamw", schedule="step"),
                     after_step=enforce, progress=False)
    assert torch.equal(w != 0, mask) or bool(((w != 0) <= mask).all())
    assert h["epochs"][-1]["lr"] < 0.01


# --------------------------------------------------------------------------- finetune (ONNX, bridge)

def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_finetune_keeps_sparsity_names_and_structure(small_onnx, digits):
    from onnxprune.sparsity.prune import prune_unstructured
    from onnxprune.training import finetune

    pruned = prune_unstructured(str(small_onnx), sparsity=0.7).model
    before = _inits(pruned)
    out, h = finetune(pruned, digits, TrainConfig(epochs=2, lr=0.02), progress=False)
    after = _inits(out)
    assert [n.name for n in out.graph.node] == [n.name for n in pruned.graph.node]
    assert list(after) == list(before) and out.opset_import == pruned.opset_import
    zero_tensors = [k for k, v in before.items() if v.ndim > 1 and (v == 0).any()]
    assert len(zero_tensors) == 3
    for k in zero_tensors:
        np.testing.assert_array_equal(after[k] == 0, before[k] == 0)  # exactly the same zeros
    assert any(not np.array_equal(after[k], before[k]) for k in zero_tensors)  # and it did train
    assert h["sparsity"] == {"masked_tensors": 3, "pruned_weights": int(sum((before[k] == 0).sum() for k in zero_tensors)),
                             "preserved": True}
    assert h["config"] == TrainConfig(epochs=2, lr=0.02).to_dict() and h["data"]["spec"] == "digits"
    assert h["test"] == evaluate_onnx(out, digits)  # reported once, by ONNX Runtime on the written model
    assert len(h["epochs"]) == 2 and 0 <= h["best_epoch"] <= 2


def test_finetune_without_keep_sparsity_regrows(small_onnx, digits):
    from onnxprune.sparsity.prune import prune_unstructured
    from onnxprune.training import finetune

    pruned = prune_unstructured(str(small_onnx), sparsity=0.7).model
    zeros = sum(int((v == 0).sum()) for v in _inits(pruned).values())
    out, h = finetune(pruned, digits, TrainConfig(epochs=1, lr=0.02), progress=False, keep_sparsity=False)
    assert sum(int((v == 0).sum()) for v in _inits(out).values()) < zeros
    assert h["sparsity"]["masked_tensors"] == 0


def test_finetune_with_teacher_distils_and_leaves_teacher_alone(small_onnx, digits, tmp_path):
    from onnxprune.structured.prune import prune_structured
    from onnxprune.training import finetune

    teacher = onnx.load(str(small_onnx))
    t_before = teacher.SerializeToString()
    student = prune_structured(str(small_onnx), ratio=0.5).model
    out, h = finetune(student, digits, TrainConfig(epochs=1, lr=0.02, distill_alpha=0.7), teacher=teacher,
                      progress=False)
    assert teacher.SerializeToString() == t_before
    assert h["teacher"] and h["config"]["distill_alpha"] == 0.7 and h["test"]["samples"] == 359


def test_finetune_cli(small_onnx, tmp_path):
    out = tmp_path / "ft.onnx"
    code, stdout, err = run_cli("finetune", small_onnx, "-o", out, "--data", "digits", "--epochs", "1", "--lr", "0.02",
                                "--schedule", "step", "--optimizer", "adamw", "--label-smoothing", "0.1",
                                "--batch-size", "128", "--seed", "1", "--history", tmp_path / "h.json", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["output"] == str(out) and res["test"]["split"] == "test" and out.exists()
    assert res["config"]["optimizer"] == "adamw" and res["config"]["batch_size"] == 128 and res["config"]["seed"] == 1
    assert json.loads((tmp_path / "h.json").read_text())["best_epoch"] == res["best_epoch"]
    code, stdout, err = run_cli("finetune", out, "-o", tmp_path / "ft2.onnx", "--epochs", "1", "--no-progress")
    assert code == 0 and "test top-1" in stdout
    code, _, err = run_cli("finetune", out, "-o", out, "--epochs", "1")
    assert code == 1 and "overwrite the input" in err
    code, _, err = run_cli("finetune", out, "-o", tmp_path / "x.onnx", "--lr", "-1")
    assert code == 1 and "lr must be" in err
    code, _, err = run_cli("finetune", "-o", tmp_path / "x.onnx")
    assert code == 1 and "missing MODEL" in err


def test_finetune_refuses_unfaithful_bridge(small_onnx, digits, monkeypatch):
    import onnxprune.bridge as bridge
    from onnxprune.training import finetune

    def unfaithful(model, *a, **k):
        raise OnnxPruneError("bridge differs from ONNX Runtime at node /f/f.0/Conv (Conv)")

    monkeypatch.setattr(bridge, "assert_bridge_faithful", unfaithful)
    with pytest.raises(OnnxPruneError, match="model: bridge differs.*Conv"):
        finetune(onnx.load(str(small_onnx)), digits, TrainConfig(epochs=1), progress=False)


# --------------------------------------------------------------------------- gradients

def test_weight_gradients_match_closed_form(tmp_path):
    from onnx import TensorProto, helper

    from onnxprune.training.gradients import weight_gradients

    rng = np.random.default_rng(0)
    n, f, c = 40, 6, 4
    x = rng.standard_normal((n, f)).astype(np.float32)
    y = rng.integers(0, c, n)
    w = rng.standard_normal((f, c)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_val=x[:4], y_val=y[:4], x_test=x[:4], y_test=y[:4])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], "lin",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    grads = weight_gradients(model, data, batches=3, batch_size=8, seed=5)
    ref = np.zeros_like(w)
    for i, (xb, yb) in enumerate(data.train.batches(8, shuffle=True, seed=5)):
        if i == 3:
            break
        z = xb @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1
        ref += xb.T @ p / len(yb)
    np.testing.assert_allclose(grads["w"], ref / 3, rtol=1e-4, atol=1e-6)


def test_weight_gradients_on_cnn_cover_every_weight(small_onnx, digits):
    from onnxprune.training.gradients import weight_gradients

    grads = weight_gradients(str(small_onnx), digits, batches=2, batch_size=32)
    inits = _inits(onnx.load(str(small_onnx)))
    conv_ws = [k for k, v in inits.items() if v.ndim == 4]
    assert conv_ws and all(grads[k].shape == inits[k].shape and np.abs(grads[k]).sum() > 0 for k in conv_ws)
    again = weight_gradients(str(small_onnx), digits, batches=2, batch_size=32)
    assert all(np.array_equal(grads[k], again[k]) for k in grads)


# --------------------------------------------------------------------------- gradual pruning

def test_prune_gradually_unstructured_agp(small_onnx, digits):
    from onnxprune.sparsity.masks import masks_of
    from onnxprune.training import prune_gradually

    model, h = prune_gradually(str(small_onnx), digits, method="unstructured", final=0.8, steps=2,
                               train_config=TrainConfig(epochs=1, lr=0.02), progress=False)
    assert h["targets"] == pytest.approx(agp_schedule(0.0, 0.8, 2))
    assert [s["step"] for s in h["per_step"]] == [1, 2]
    assert all(s["retrain"]["config"] == h["config"] == TrainConfig(epochs=1, lr=0.02).to_dict() for s in h["per_step"])
    assert all(s["retrain"]["test"] is None for s in h["per_step"]) and h["test"]["samples"] == 359
    masks = masks_of(model)
    total = sum(m.size for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned / total == pytest.approx(0.8, abs=0.02)
    # zeros of step 1 are still zero at the end
    assert h["per_step"][0]["retrain"]["sparsity"]["preserved"] and h["per_step"][1]["retrain"]["sparsity"]["preserved"]


def test_prune_gradually_structured_ratio_of_original_channels(small_onnx, digits):
    from onnxprune.training import prune_gradually

    model, h = prune_gradually(str(small_onnx), digits, method="structured", final=0.5, steps=2, schedule="linear",
                               train_config=TrainConfig(epochs=1, lr=0.02), progress=False)
    first, second = h["per_step"]
    assert first["asked"]["ratio"] == pytest.approx(0.25)
    kept1 = first["channels_fraction_of_original"]
    assert second["asked"]["ratio"] == pytest.approx(1 - 0.5 / kept1)  # counted on the original channels
    inits = _inits(model)
    channels = [inits[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"]
    assert abs(sum(channels) - 7) <= 1  # half of the original 6 + 8
    with pytest.raises(OnnxPruneError, match="must not set"):
        prune_gradually(str(small_onnx), digits, method="structured", final=0.5, steps=2, prune_kwargs={"ratio": 0.1})


# --------------------------------------------------------------------------- DDP (gloo, 2 CPU processes)

def test_ddp_two_processes_end_with_identical_weights(small_onnx, tmp_path):
    from onnxprune.training.ddp import launch_local

    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64).to_dict()
    out = launch_local(small_onnx, "digits", cfg, tmp_path / "ddp", nprocs=2)
    r0, r1 = np.load(out / "rank0.npz"), np.load(out / "rank1.npz")
    assert r0.files == r1.files and len(r0.files) > 4
    for k in r0.files:
        np.testing.assert_array_equal(r0[k], r1[k])
    start = list(_inits(onnx.load(str(small_onnx))).values())
    assert any(not np.array_equal(r0[f"w{i}"], s) for i, s in enumerate(start))
    h = json.loads((out / "history.json").read_text())
    assert h["world_size"] == 2 and h["train_batches_per_epoch"] == math.ceil(540 / 32)
    assert (out / "model.onnx").exists()


# --------------------------------------------------------------------------- PyTorch-source path

def test_torch_source_prune_retrain_export(tmp_path, digits, monkeypatch):
    from onnxprune.training.torch_source import load_torch_factory, prune_torch_model

    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def small():
            return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_torch_factory("mymodels:small")
    torch.save(m.state_dict(), tmp_path / "w.pt")
    m2 = load_torch_factory(f"{tmp_path / 'mymodels.py'}:small", state_dict=tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    ex = torch.zeros(1, 1, 8, 8)
    m, s = prune_torch_model(m, ex, ratio=0.5)
    assert s["macs_after"] < s["macs_before"] and m[0].out_channels == 4 and m[-1].out_features == 10
    m3, s3 = prune_torch_model(load_torch_factory("mymodels:small"), ex, target_macs=0.5)
    assert 0.4 < s3["macs_fraction"] <= 0.5
    h = train_module(m, digits, TrainConfig(epochs=1, lr=0.05), progress=False)
    export_torch(m, (ex,), tmp_path / "p.onnx")
    assert evaluate_onnx(tmp_path / "p.onnx", digits)["top1"] > 0.3 and h["best_epoch"] >= 0
    with pytest.raises(OnnxPruneError, match="no callable"):
        load_torch_factory("mymodels:nope")
    with pytest.raises(OnnxPruneError, match="module:factory"):
        load_torch_factory("mymodels")
    code, out, err = run_cli("finetune", "--torch", "mymodels:small", "--state-dict", tmp_path / "w.pt",
                             "--target-macs", "0.5", "-o", tmp_path / "cli.onnx", "--epochs", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["prune"]["library"] == "torch-pruning" and res["test"]["samples"] == 359
    assert (tmp_path / "cli.onnx").exists()


def test_prune_gradually_structured_macs_target(small_onnx, digits):
    from onnxprune.training import prune_gradually

    model, h = prune_gradually(str(small_onnx), digits, method="structured", final=0.5, steps=2,
                               structured_target="macs", train_config=TrainConfig(epochs=1, lr=0.02), progress=False)
    fractions = [s["macs_fraction_of_original"] for s in h["per_step"]]
    assert fractions[0] > fractions[1] and fractions[1] <= 0.5 + 1e-9 and fractions[1] > 0.3


def test_training_and_eval_on_user_dataloaders(tmp_path, monkeypatch, small_onnx):
    (tmp_path / "dl.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from onnxprune.datasets import load_dataset
        def make():
            d = load_dataset("digits")
            t = lambda s, bs: DataLoader(TensorDataset(torch.from_numpy(s.x), torch.from_numpy(s.y)), batch_size=bs)
            return {"train": t(d.train, 64), "val": t(d.val, 100), "test": t(d.test, 100), "num_classes": 10}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_dataset("python:dl:make")
    ref = load_dataset("digits")
    assert evaluate_onnx(small_onnx, data) == evaluate_onnx(small_onnx, ref)
    torch.manual_seed(0)
    m = SmallCNN()
    h = train_module(m, data, TrainConfig(epochs=1, lr=0.05), progress=False)
    assert h["train_batches_per_epoch"] == 17 and h["epochs"][0]["train_top1"] > 0.2


def test_finetune_explains_a_graph_tied_to_batch_one(digits):
    from onnx import TensorProto, helper

    from onnxprune.training import finetune

    w = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32) * 0.1
    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
         helper.make_node("MatMul", ["flat", "w"], ["logits"], name="mm")], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(np.array([1, 64], np.int64), "shape"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    with pytest.raises(OnnxPruneError, match="fixed batch size of 1.*dynamic batch"):
        finetune(model, digits, TrainConfig(epochs=1), progress=False)
