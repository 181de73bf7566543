"""Output kinds (scores / probs / embedding / value): inference from the graph, the loss each kind gets
(per-channel normalised values, cosine for embeddings), the figures ``eval --reference`` reports, and
that label-free distillation of an embedding model actually learns (KL at T=4 on an embedding is ~0)."""
from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from cli_util import run_cli
from onnx import TensorProto, helper

from onnxprune.datasets.fidelity import evaluate_fidelity, mean_cosine, nn_agreement, output_fidelity
from onnxprune.datasets.output_kind import infer_output_kinds, parse_output_kinds
from onnxprune.core.errors import OnnxPruneError

torch = pytest.importorskip("torch")


def _graph(nodes, outputs, extra_inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), *nodes], "g", [x], outs,
                          [w, *extra_inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_kinds_inferred_from_the_graph():
    eps = helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-12])
    m = _graph([helper.make_node("Softmax", ["h"], ["s"], axis=1), helper.make_node("Flatten", ["s"], ["probs"]),
                helper.make_node("LogSoftmax", ["h"], ["logp"], axis=1),
                helper.make_node("LpNormalization", ["h"], ["lp"], axis=-1, p=2),
                helper.make_node("ReduceL2", ["h"], ["n"], axes=[1], keepdims=1),
                helper.make_node("Max", ["n", "eps"], ["n2"]), helper.make_node("Div", ["h", "n2"], ["e"]),
                helper.make_node("Mul", ["h", "h"], ["sq"]), helper.make_node("ReduceSum", ["sq"], ["ss"], keepdims=1),
                helper.make_node("Sqrt", ["ss"], ["nrm"]), helper.make_node("Div", ["h", "nrm"], ["e2"]),
                helper.make_node("LpNormalization", ["h"], ["l1"], axis=-1, p=1),
                helper.make_node("Relu", ["h"], ["v"])],
               ["h", "probs", "logp", "lp", "e", "e2", "l1", "v"], [eps])
    kinds = infer_output_kinds(m)
    assert kinds == {"h": "value", "probs": "probs", "logp": "scores", "lp": "embedding", "e": "embedding",
                     "e2": "embedding", "l1": "value", "v": "value"}
    # labels declare a classifier: its first output is class scores; nothing else changes
    assert infer_output_kinds(m, labeled=True)["h"] == "scores"
    assert infer_output_kinds(m, labeled=True)["v"] == "value"
    # a declaration wins
    assert infer_output_kinds(m, declared={"v": "embedding", "probs": "value"})["v"] == "embedding"
    with pytest.raises(OnnxPruneError, match="does not output"):
        infer_output_kinds(m, declared={"nope": "scores"})


def test_torch_normalize_export_is_an_embedding():
    net = _EmbedNet()
    assert infer_output_kinds(_export(net)) == {"emb": "embedding"}


def test_parse_output_kinds():
    assert parse_output_kinds(["a=scores", "b/c:0=embedding"]) == {"a": "scores", "b/c:0": "embedding"}
    for bad in (["a"], ["a=logits"], ["=scores"]):
        with pytest.raises(OnnxPruneError, match="--output-kind"):
            parse_output_kinds(bad)


# --------------------------------------------------------------------------- losses by kind

def test_value_loss_is_normalised_per_channel():
    """A box channel in pixels must not swamp the logits next to it: scaling one channel of both
    student and teacher leaves the loss unchanged (a global std would let it dominate)."""
    from onnxprune.training.distill import regression_distill_loss

    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 6, 10, generator=g)
    s = t + 0.3 * torch.randn(16, 6, 10, generator=g)
    k = torch.ones(1, 6, 1)
    k[:, :2] = 500.0  # "box pixels"
    assert float(regression_distill_loss(s * k, t * k)) == pytest.approx(float(regression_distill_loss(s, t)), rel=1e-4)
    # the error of the small channels still moves the loss when the big ones are exact
    s2 = t.clone()
    s2[:, 2:] += 0.5
    assert float(regression_distill_loss(s2 * k, t * k)) > 0.05


def test_teacher_channel_scales_are_the_per_channel_std_on_the_data():
    from onnxprune.datasets.core import DatasetSplits, Split
    from onnxprune.training.loop import teacher_channel_scales

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 3, 5)) * np.array([1.0, 100.0, 0.01])[None, :, None]).astype(np.float32)
    data = DatasetSplits(train=Split(x=x), val=Split(x=x[:10]), test=Split(x=x[:0]), num_classes=0, input_shape=(3, 5))
    got = teacher_channel_scales(torch.nn.Identity(), data, ["value"], batch_size=64)
    want = x.transpose(1, 0, 2).reshape(3, -1).std(1, ddof=1)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5)
    assert teacher_channel_scales(torch.nn.Identity(), data, ["scores"]) == [None]


def test_embedding_loss_moves_where_kl_at_temperature_does_not():
    from onnxprune.training.distill import distillation_loss, kind_loss

    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(32, 48, generator=g), dim=1)
    s = torch.nn.functional.normalize(t + 0.8 * torch.randn(32, 48, generator=g), dim=1)
    cos = float(torch.nn.functional.cosine_similarity(s, t).mean())
    assert float(kind_loss("embedding", s, t)) == pytest.approx(1 - cos, rel=1e-5) and cos < 0.9
    # the bug: softmax of values within +-1 at T=4 is ~uniform, the KL a small fraction of the cosine gap
    assert float(distillation_loss(s, t, 4.0)) < 0.1 * (1 - cos)
    assert float(kind_loss("embedding", t, t)) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- figures by kind

def test_embedding_figures_are_cosine_and_nearest_neighbour_never_top1():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 8))
    assert mean_cosine(ref, ref) == pytest.approx(1.0) and nn_agreement(ref, ref) == 1.0
    assert mean_cosine(ref, -ref) == pytest.approx(-1.0)
    shuffled = ref[rng.permutation(50)]
    assert nn_agreement(ref, shuffled) < 0.3
    f = output_fidelity(ref, ref + 0.01 * rng.normal(size=ref.shape), kind="embedding")
    assert "top1_agreement" not in f and f["mean_cosine"] > 0.99 and f["nn_agreement"] > 0.9
    assert set(output_fidelity(ref, ref, kind="value")) == {"rel_l2", "cosine", "max_abs_diff"}
    assert output_fidelity(ref, ref, kind="scores")["top1_agreement"] == 1.0


class _EmbedNet(torch.nn.Module):
    """Tokens (N x 6 x 8 floats) -> FFN per token -> mean pool -> L2 normalise: a sentence-embedding head."""

    def __init__(self, hidden: int = 48, dim: int = 16):
        super().__init__()
        self.ffn = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x):
        return torch.nn.functional.normalize(self.ffn(x).mean(1), dim=-1)


def _export(net) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(2, 6, 8), buf, input_names=["x"], output_names=["emb"], opset_version=13,
                      dynamic_axes={"x": {0: "n"}, "emb": {0: "n"}}, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def embed_models(tmp_path_factory):
    """A trained embedding net (cosine to class prototypes on generated sequences), a copy with 60 %
    of its FFN hidden channels removed, and unlabeled inputs."""
    from onnxprune.structured.prune import prune_structured

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 8)).astype(np.float32)
    y = rng.integers(0, 5, 600)
    x = (centers[y][:, None, :] + rng.normal(0, 1.0, (600, 6, 8))).astype(np.float32)
    protos = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    net = _EmbedNet()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        b = torch.randint(0, 600, (64,))
        opt.zero_grad()
        (1 - (net(xt[b]) * protos[yt[b]]).sum(1)).mean().backward()
        opt.step()
    d = tmp_path_factory.mktemp("embed")
    dense = _export(net)
    onnx.save(dense, str(d / "dense.onnx"))
    pruned = prune_structured(dense, ratio=0.6).model
    onnx.save(pruned, str(d / "pruned.onnx"))
    np.savez(d / "unl.npz", x=x)
    yield d
    torch.set_num_threads(prev)


def test_eval_reference_reports_an_embedding_by_cosine(embed_models):
    d = embed_models
    code, out, err = run_cli("eval", d / "pruned.onnx", "--data", f"npz:{d / 'unl.npz'}", "--reference",
                             d / "dense.onnx", "--json")
    assert code == 0, err
    res = json.loads(out)
    f = res["fidelity"]["emb"]
    assert res["output_kinds"] == {"emb": "embedding"}
    assert "top1_agreement" not in f and 0 < f["mean_cosine"] < 0.999 and 0 <= f["nn_agreement"] <= 1
    code, out, err = run_cli("eval", d / "pruned.onnx", "--data", f"npz:{d / 'unl.npz'}", "--reference",
                             d / "dense.onnx", "--output-kind", "emb=value", "--json")
    assert code == 0, err
    assert "mean_cosine" not in json.loads(out)["fidelity"]["emb"]
    code, out, err = run_cli("eval", d / "pruned.onnx", "--data", f"npz:{d / 'unl.npz'}", "--reference",
                             d / "dense.onnx", "--output-kind", "nope=scores")
    assert code != 0 and "does not output" in err and "Traceback" not in err


def test_label_free_distillation_of_an_embedding_learns(embed_models, tmp_path):
    """The bug: taken for class scores, an L2-normalised embedding is matched by KL at T=4, the loss
    is ~0 from the first step and nothing moves. By kind it is matched by cosine and improves."""
    from onnxprune.training import TrainConfig, finetune

    d = embed_models
    pruned, dense = onnx.load(str(d / "pruned.onnx")), onnx.load(str(d / "dense.onnx"))
    cfg = TrainConfig(steps=150, lr=0.05, batch_size=32, seed=0)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, h = finetune(pruned, f"npz:{d / 'unl.npz'}", cfg, teacher=dense, progress=False, evaluate_test=False)
        m_kl, h_kl = finetune(pruned, f"npz:{d / 'unl.npz'}", cfg, teacher=dense, progress=False, evaluate_test=False,
                           output_kinds={"emb": "scores"})
    finally:
        torch.set_num_threads(prev)
    assert h["output_kinds"] == {"emb": "embedding"} and h["function_matching"] and h["augment"] == ["mixup", "noise"]
    c0, c1 = h["initial_val"][0]["mean_cosine"], h["best_val"][0]["mean_cosine"]
    print(f"embedding: val mean cosine {c0:.4f} -> {c1:.4f} (cosine loss); KL-at-T=4 path: first loss "
          f"{h_kl['epochs'][0]['train_loss']:.2e}, {h['val_fidelity']['emb']['mean_cosine']:.4f} ONNX Runtime val")
    assert h["epochs"][0]["train_loss"] > 1e-3
    assert 1 - c1 < 0.5 * (1 - c0), (c0, c1)  # the cosine gap to dense at least halves
    assert h["best_step"] > 0 and h["val_fidelity"]["emb"]["mean_cosine"] == pytest.approx(c1, abs=2e-3)
    from onnxprune.datasets import load_dataset

    val = {"x": load_dataset(f"npz:{d / 'unl.npz'}").val.x}
    k0, k1 = (evaluate_fidelity(m, dense, val)[0]["outputs"]["emb"]["mean_cosine"] for m in (pruned, m_kl))
    print(f"KL at T=4 on the embedding: first loss {h_kl['epochs'][0]['train_loss']:.2e} (cosine path "
          f"{h['epochs'][0]['train_loss']:.2e}), val mean cosine {k0:.4f} -> {k1:.4f}")
    # KL at temperature on an embedding: a loss near 0, and much less learnt
    assert h_kl["epochs"][0]["train_loss"] < 0.1 * h["epochs"][0]["train_loss"]
    assert 1 - c1 < 0.5 * (1 - k1)  # the cosine loss ends at least twice as close to dense
