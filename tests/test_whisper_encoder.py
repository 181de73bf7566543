"""A Whisper-style audio encoder (Conv1d stem, positional table sliced to the run-time length,
pre-LN layers): heads, FFN columns and the stem's inner channels prune exactly, the hidden size
stays whole (saying why), dynamic batch and frames stay, MACs count convs, projections and
attention at the given input shape. Hugging Face's own ``WhisperEncoder`` (tiny config, random
weights) is checked through the TorchScript and the dynamo exporters.

Exactness is the zeroed-channel oracle of ``test_transformers`` (see :mod:`arch_zoo`).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arch_zoo import randomize_norms
from cli_util import run_cli
from conftest import run_ort
from test_transformers import _oracle
from transformer_models import WhisperLikeEncoder, export_whisper, hf_whisper_encoder
from onnxprune.channels import analyze_channels
from onnxprune.core.prepare import prepare
from onnxprune.metrics.inspection import inspect_model

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning", "ignore::FutureWarning")

MELS, D, HEADS, FFN, LAYERS, FRAMES = 8, 16, 4, 32, 2, 32
SHAPES = {"input_features": (1, MELS, FRAMES)}


def _feeds(batch: int, frames: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_features": rng.standard_normal((batch, MELS, frames)).astype(np.float32)}


def _macs(batch: int, frames: int, heads: int = HEADS, ffn: int = FFN, stem: int = D) -> int:
    """conv1 (k=3, every frame), conv2 (k=3, stride 2), then per layer q/k/v/out projections,
    ``Q @ K^T`` and ``attn @ V`` and the FFN at ``T = frames / 2`` positions."""
    t, width = (frames + 1) // 2, heads * (D // HEADS)
    convs = frames * stem * MELS * 3 + t * D * stem * 3
    layer = 4 * t * D * width + 2 * t * t * width + 2 * t * D * ffn
    return batch * (convs + LAYERS * layer)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory, one_torch_thread):
    """WhisperLikeEncoder with random norms, TorchScript export, dynamic batch and frames."""
    torch.manual_seed(0)
    return export_whisper(randomize_norms(WhisperLikeEncoder(MELS, D, HEADS, FFN, LAYERS)),
                          tmp_path_factory.mktemp("whisper") / "whisper.onnx", frames=FRAMES)


def _check_groups(an, hidden_reason: str) -> None:
    """Per layer one group of whole heads and one FFN group, the stem's inner channels (conv1 out,
    conv2 in) one conv group; the hidden size (conv2 out, the stream) left whole for ``hidden_reason``."""
    by_size = {s: [g for g in an.prunable if g.size == s] for s in (HEADS, FFN, D)}
    assert len(by_size[HEADS]) == LAYERS and len(by_size[FFN]) == LAYERS and len(by_size[D]) == 1
    for g in by_size[HEADS]:
        assert g.exact and {m.node.split("/")[-2] for m in g.members_with_role("out")} == {"q_proj", "k_proj", "v_proj"}
        assert {m.node.split("/")[-2] for m in g.members_with_role("in")} == {"out_proj"}
    (stem,) = by_size[D]
    assert stem.exact and {(m.node.split("/")[-2], m.role) for m in stem.members if m.role != "act"} == {
        ("conv1", "out"), ("conv1", "param"), ("conv2", "in")}
    (hidden,) = [g for g in an.groups if not g.prunable]
    assert hidden.size == D and hidden_reason in hidden.reason
    assert ("conv2", "out") in {(m.node.split("/")[-2], m.role) for m in hidden.members}


@pytest.mark.parametrize("shapes", [SHAPES, None], ids=["1x8x32", "symbolic"])
def test_heads_ffn_and_stem_prune_exactly(whisper, shapes):
    """Whether the input shape is given (the positional Slice folds) or not (its end is read by
    Shape at run time), the same groups come out; the pruned model equals the zeroed original at
    other batch sizes and frame counts, and keeps its dynamic axes."""
    prep = prepare(whisper, shapes)
    _check_groups(analyze_channels(prep.view), "positional table 'm.embed_positions.weight'")
    an = analyze_channels(prep.view, prune_hidden=True)  # the hidden size is also the output
    _check_groups(an, "reaches model output 'last_hidden_state'")
    pruned, _ = _oracle(prep, an, [_feeds(1, FRAMES), _feeds(3, 20, 1), _feeds(2, 64, 2)])
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(pruned.graph.input[0]) == ["batch", MELS, "frames"]
    assert dims(pruned.graph.output[0]) == ["batch", "time", D]


def test_inspect_counts_conv_projection_and_attention_macs(whisper):
    assert inspect_model(whisper, SHAPES)["macs"] == _macs(1, FRAMES)
    assert inspect_model(whisper, {"input_features": (2, MELS, 48)})["macs"] == _macs(2, 48)
    info = inspect_model(whisper)
    assert info["macs"] is None and "--input-shape" in info["macs_unknown_reason"]


def test_prune_ratio_halves_heads_ffn_stem_and_macs(whisper, tmp_path):
    out = tmp_path / "half.onnx"
    code, stdout, err = run_cli("prune", whisper, "-o", out, "--structured", "--ratio", "0.5", "--json",
                                "--input-shape", f"input_features=1x{MELS}x{FRAMES}")
    assert code == 0, err
    summary = json.loads(stdout)
    half = _macs(1, FRAMES, heads=HEADS // 2, ffn=FFN // 2, stem=D // 2)
    assert summary["macs_before"] == _macs(1, FRAMES) and summary["macs_after"] == half
    assert summary["macs_before"] / summary["macs_after"] > 1.9
    for b, f in ((2, 20), (1, 48)):
        assert run_ort(out, _feeds(b, f))[0].shape == (b, f // 2, D)
    assert inspect_model(out, SHAPES)["macs"] == half


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_hugging_face_whisper_encoder(tmp_path, one_torch_thread, dynamo):
    """Hugging Face's WhisperEncoder (it takes exactly 2 * max_source_positions frames and adds its
    whole positional table): heads, FFN and stem prune exactly at batch 1 and 3."""
    pytest.importorskip("transformers")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    path = export_whisper(hf_whisper_encoder(MELS, D, HEADS, FFN, LAYERS, FRAMES), tmp_path / "hf.onnx",
                          frames=FRAMES, dynamo=dynamo, dynamic_frames=False)
    prep = prepare(path, SHAPES)
    assert len([g for g in analyze_channels(prep.view).groups if not g.prunable]) == 1  # the hidden size
    an = analyze_channels(prep.view, prune_hidden=True)
    assert len(an.prunable) == 2 * LAYERS + 1 and all(g.exact for g in an.prunable)
    assert {g.size for g in an.prunable} == {HEADS, FFN, D}
    (hidden,) = [g for g in an.groups if not g.prunable]
    assert hidden.size == D and "reaches model output 'last_hidden_state'" in hidden.reason
    _oracle(prep, an, [_feeds(1, FRAMES), _feeds(3, FRAMES, 1)])
    assert inspect_model(path, SHAPES)["macs"] == _macs(1, FRAMES)
