"""Sparse initializers, file and gzip sizes, masks for retraining."""
from __future__ import annotations

import gzip

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import zoo
from conftest import random_feeds, run_ort
from onnxprune.sparsity import masks_of, prune_nm, prune_unstructured
from onnxprune.sparsity.masks import apply_masks
from onnxprune.core.model_io import sparse_to_dense
from onnxprune.sparsity.storage import densify, gzip_file_bytes, serialized_sizes


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    return zoo.export("flatten_mlp", tmp_path_factory.mktemp("zoo_storage"))


def test_sparse_storage_is_smaller_and_runs_the_same(mlp_path):
    dense = prune_unstructured(mlp_path, sparsity=0.9)
    sparse = prune_unstructured(mlp_path, sparsity=0.9, sparse_storage=True)
    assert dense.summary["storage"] == "dense" and sparse.summary["storage"] == "sparse"
    assert sparse.summary["sparse_initializers"]
    assert {s.values.name for s in sparse.model.graph.sparse_initializer} == set(sparse.summary["sparse_initializers"])
    assert sparse.summary["file_bytes"] < dense.summary["file_bytes"]
    assert sparse.summary["file_bytes"] == len(sparse.model.SerializeToString())
    feeds = random_feeds(dense.model)
    for a, b in zip(run_ort(dense.model, feeds), run_ort(sparse.model, feeds)):
        assert np.array_equal(a, b)
    # densify restores exactly the dense weights, and a sparse file can be pruned again
    back = {t.name: numpy_helper.to_array(t) for t in densify(sparse.model).graph.initializer}
    for t in dense.model.graph.initializer:
        assert np.array_equal(back[t.name], numpy_helper.to_array(t))
    again = prune_unstructured(sparse.model, sparsity=0.95)
    assert again.summary["achieved_sparsity"] == pytest.approx(0.95, abs=1e-3)


def test_sparse_storage_declined_when_not_smaller(mlp_path):
    res = prune_nm(mlp_path, n=2, m=4, sparse_storage=True)  # 50% dense: int64 indices would cost more
    assert res.summary["storage"] == "dense" and not res.model.graph.sparse_initializer
    assert any("kept dense" in n for n in res.summary["notes"])


def test_sizes_reported(mlp_path, tmp_path):
    res = prune_unstructured(mlp_path, sparsity=0.8)
    data = res.model.SerializeToString()
    assert res.summary["file_bytes"] == len(data)
    assert res.summary["gzip_bytes"] == serialized_sizes(res.model)[1] < len(data)
    original_gz = serialized_sizes(onnx.load(str(mlp_path)))[1]
    assert res.summary["gzip_bytes"] < original_gz  # zeros compress: the real gain on CPU runtimes
    out = tmp_path / "m.onnx"
    out.write_bytes(data)
    assert gzip_file_bytes(out) == len(gzip.compress(data, compresslevel=6, mtime=0))


def test_sparse_to_dense_coordinate_indices():
    from onnx import helper

    vals = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    idx = numpy_helper.from_array(np.array([[0, 1], [2, 0]], np.int64), "i")
    sp = helper.make_sparse_tensor(vals, idx, [3, 2])
    assert sparse_to_dense(sp).tolist() == [[0, 1], [0, 0], [2, 0]]


def test_masks_of_and_apply(mlp_path):
    res = prune_unstructured(mlp_path, sparsity=0.5)
    masks = masks_of(res.model)
    weights = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert set(masks) == {x["weight"] for x in res.summary["layers"]}
    for name, mask in masks.items():
        assert mask.dtype == bool and np.array_equal(mask, weights[name] != 0)
    updated = {k: v + 1.0 for k, v in weights.items()}  # a training step moves the zeros...
    kept = apply_masks(updated, masks)
    for name, mask in masks.items():  # ...the masks put them back
        assert np.array_equal(kept[name] != 0, mask)
    assert masks_of(onnx.load(str(mlp_path))) == {}  # a dense model needs no masks
    sparse = prune_unstructured(mlp_path, sparsity=0.9, sparse_storage=True).model
    assert set(masks_of(sparse)) == {x["weight"] for x in res.summary["layers"]}


def test_gzip_size_of_a_large_stream_is_a_multi_member_gzip(monkeypatch):
    """Large streams are compressed in parallel members; the size is that of a real .gz file."""
    from onnxprune.sparsity import storage

    rng = np.random.default_rng(0)
    data = (rng.standard_normal(40_000).astype(np.float32) * (rng.random(40_000) < 0.3)).tobytes()
    one = len(gzip.compress(data, compresslevel=6, mtime=0))
    assert storage._gzip_size_stream([data[:1000], data[1000:]]) == one  # one member below the block size
    monkeypatch.setattr(storage, "GZIP_MEMBER_BYTES", 30_000)
    blocks = [data[i:i + 30_000] for i in range(0, len(data), 30_000)]
    members = b"".join(gzip.compress(b, compresslevel=6, mtime=0) for b in blocks)
    assert gzip.decompress(members) == data  # concatenated members are one valid gzip file
    assert storage._gzip_size_stream(iter([data[:7], data[7:70_001], data[70_001:]])) == len(members)
    assert abs(len(members) - one) / one < 0.02
    assert storage._gzip_size_stream([]) == len(gzip.compress(b"", compresslevel=6, mtime=0))
