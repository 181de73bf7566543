"""How pruned weights are stored, and what that costs on disk.

Runtimes load dense initializers, so the pruned model keeps dense storage by default: its zeros
cost as much space as any other value, and the gain is the *compressed* size (zip/gzip of the
file), which this module always measures. ``sparse_storage`` moves a weight into
``graph.sparse_initializer`` (values + int64 linear indices; int64 is what ONNX Runtime accepts)
when that is smaller, which pays off below about 1/3 density for float32 weights. ONNX Runtime
densifies sparse initializers when it loads the model; every sparse file is loaded once in ONNX
Runtime before it is returned, and kept dense if that fails.
"""
from __future__ import annotations

import gzip
import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.model_io import PROTOBUF_LIMIT, model_files, proto_bytes, serialize_within_limit, sparse_to_dense, without_initializers
from ..core.runtime import load_error

#: gzip level used for the reported compressed size (gzip's own default).
GZIP_LEVEL = 6
#: bytes of one sparse index (int64 linear index).
INDEX_BYTES = 8


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with every ``sparse_initializer`` turned into a dense initializer."""
    if not model.graph.sparse_initializer:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for sp in m.graph.sparse_initializer:
        m.graph.initializer.append(numpy_helper.from_array(sparse_to_dense(sp), sp.values.name))
    del m.graph.sparse_initializer[:]
    return m


def sparse_is_smaller(arr: np.ndarray) -> bool:
    """Whether values + int64 indices take fewer bytes than the dense array."""
    nnz = int(np.count_nonzero(arr))
    return nnz * (arr.dtype.itemsize + INDEX_BYTES) + 16 < arr.size * arr.dtype.itemsize


def to_sparse_storage(model: onnx.ModelProto, names: Iterable[str]) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Move the initializers ``names`` to sparse storage where that is smaller.

    Returns ``(model, moved, notes)``; the input model is not modified. The result is loaded once in
    ONNX Runtime; if that fails (or the model is over the protobuf limit), the dense model is
    returned with a note saying why.
    """
    wanted = set(names)
    graph_inputs = {i.name for i in model.graph.input}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, moved = [], []
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t) if t.name in wanted and t.name not in graph_inputs else None
        if arr is None or arr.size == 0 or not sparse_is_smaller(arr):
            keep.append(t)
            continue
        flat = arr.reshape(-1)
        nz = np.flatnonzero(flat)
        values = numpy_helper.from_array(flat[nz], t.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), f"{t.name}.indices")
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
        moved.append(t.name)
    if not moved:
        return model, [], ["sparse storage: no weight is sparse enough for sparse storage to be smaller "
                           "(needs roughly < 1/3 nonzero for float32); kept dense"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    if proto_bytes(m) > PROTOBUF_LIMIT:
        return model, [], ["sparse storage: model over 2 GB, kept dense storage with external data"]
    why = load_error(m)
    if why is not None:  # any load failure means: keep dense
        first = why[:200]
        return model, [], [f"sparse storage: ONNX Runtime cannot load this model with sparse initializers ({first}); "
                           "kept dense storage"]
    return m, moved, [f"sparse storage: {len(moved)} weight(s) stored as sparse initializers "
                      "(ONNX Runtime densifies them at load; other tools may not read them)"]


def serialized_sizes(model: onnx.ModelProto) -> tuple[int, int]:
    """``(bytes, gzip bytes)`` of the serialized model (in memory, gzip level 6)."""
    data = serialize_within_limit(model)
    if data is None:
        return proto_bytes(model), _gzip_size_stream(_tensor_chunks(model))
    return len(data), _gzip_size_stream([data])


def gzip_file_bytes(path: str | os.PathLike) -> int:
    """gzip-compressed size of a saved model, external data files included (streamed, level 6)."""
    files = model_files(path)

    def chunks():
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    yield chunk
    return _gzip_size_stream(chunks())


#: Bytes per gzip member when a large stream is compressed in parallel.
GZIP_MEMBER_BYTES = 1 << 24


def _gzip_size_stream(chunks: Iterable[bytes]) -> int:
    """Size of the stream as a gzip file (level 6) made of 16 MiB members, compressed on every core
    (zlib releases the GIL; gzip level 6 runs at tens of MB/s, minutes for a multi-GB model). A
    multi-member file is valid gzip and within ~0.01% of a one-member one; data up to 16 MiB is one
    member, byte for byte what ``gzip.compress`` gives."""
    blocks = _blocks(chunks, GZIP_MEMBER_BYTES)
    first = next(blocks, b"")
    second = next(blocks, None)
    if second is None:  # one member: no threads
        return _gzip_len(first)
    workers = os.cpu_count() or 1
    total, pending = 0, deque()
    with ThreadPoolExecutor(workers) as pool:
        for block in itertools.chain([first, second], blocks):
            pending.append(pool.submit(_gzip_len, block))
            if len(pending) > 2 * workers:  # bounded memory: a few blocks in flight
                total += pending.popleft().result()
        return total + sum(f.result() for f in pending)


def _gzip_len(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))


def _blocks(chunks: Iterable[bytes], size: int) -> Iterable[bytes]:
    """Re-cut a stream of chunks into blocks of ``size`` bytes (the last one shorter)."""
    buf = bytearray()
    for c in chunks:
        buf += c
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def _tensor_chunks(model: onnx.ModelProto) -> Iterable[bytes]:
    """An approximation of a huge model's bytes: its graph without weights, then each weight's raw data."""
    yield without_initializers(model).SerializeToString()
    for t in model.graph.initializer:
        yield t.SerializeToString()
