"""Loading ONNX files defensively and writing them atomically.

Users hand us arbitrary files, so every way a file can be wrong is turned into one clear
:class:`OnnxPruneError` naming the file. Writes go to a temporary file in the destination folder
and are renamed into place, so a crash never leaves a half-written model behind and the input is
never touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import numpy_helper

from .errors import OnnxPruneError
from .graph import sort_topologically
from .shapes import skeleton, graph_inputs

#: file_sha256's memo: (resolved path, size, mtime) -> digest
_FILE_HASHES: dict[tuple[str, int, int], str] = {}

#: protobuf's hard limit; larger models must keep their weights in external data files.
PROTOBUF_LIMIT = 2**31 - 1
#: Operator domains ONNX Runtime implements; anything else is a custom op we cannot run or reason about.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}


def load_model(path: str | os.PathLike, *, check: bool = True, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX file, raising :class:`OnnxPruneError` for every kind of bad input."""
    p = Path(path)
    if not p.exists():
        raise OnnxPruneError(f"{p}: no such file")
    if p.is_dir():
        raise OnnxPruneError(f"{p}: is a directory, expected an .onnx file")
    size = p.stat().st_size
    if size == 0:
        raise OnnxPruneError(f"{p}: file is empty")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise OnnxPruneError(f"{p}: not a valid ONNX protobuf ({_first_line(exc)})") from exc
    except OSError as exc:
        raise OnnxPruneError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise OnnxPruneError(f"{p}: not an ONNX model (no graph found; is this really an .onnx file?)")
    if model.ir_version == 0 or not model.opset_import:
        raise OnnxPruneError(f"{p}: not an ONNX model (missing ir_version or opset_import)")
    if not model.graph.output:
        raise OnnxPruneError(f"{p}: the graph declares no outputs: nothing to compute")

    sort_topologically(model.graph, str(p))
    _check_domains(model, p)
    _remember_files(p, model)
    if load_external_data and _uses_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise OnnxPruneError(f"{p}: cannot load external weight data ({_first_line(exc)})") from exc
    if check:
        check_model(model, p)
    return model


def check_model(model: onnx.ModelProto, label: str | os.PathLike = "model", *, full_check: bool = False) -> None:
    """Run the ONNX checker on the graph structure, and check every weight's data length.

    The checker runs on a weight-free skeleton: serializing a large model just to validate it
    costs more than everything else onnxprune does to it, and never fits over 2 GB.
    """

    try:
        onnx.checker.check_model(skeleton(model), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise OnnxPruneError(f"{label}: fails the ONNX checker: {_first_line(exc)}") from exc
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or not t.raw_data:
            continue
        expected = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(t.raw_data) != expected:
            raise OnnxPruneError(f"{label}: fails the ONNX checker: initializer {t.name!r} holds {len(t.raw_data)} bytes, "
                                 f"its shape {list(t.dims)} needs {expected}")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, overwrite_ok: bool = True) -> Path:
    """Write ``model`` to ``path`` atomically (temp file + rename); weights go external over 2 GB."""
    dest = Path(path)
    if dest.is_dir():
        raise OnnxPruneError(f"{dest}: is a directory, expected an output file path")
    if dest.exists() and not overwrite_ok:
        raise OnnxPruneError(f"{dest}: already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        _save(model, tmp, external_name=dest.name + ".data")
        data_tmp = tmp.parent / (dest.name + ".data")
        written = data_tmp.exists()
        if written and tmp.parent != dest.parent:
            os.replace(data_tmp, dest.parent / data_tmp.name)
    _remember(dest, [dest, dest.parent / data_tmp.name] if written else [dest])  # sizes need no re-parse
    return dest


def refuse_overwrite_input(inp: str | os.PathLike, out: str | os.PathLike) -> None:
    """The input file is never modified: refuse an output path that is the input itself."""
    if Path(out).exists() and Path(out).resolve() == Path(inp).resolve():
        raise OnnxPruneError(f"{out}: output would overwrite the input model; choose another path")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp = tmpdir / dest.name
    try:
        yield tmp
        if tmp.is_dir():
            if dest.exists():
                shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file followed by the external data files it references (those that exist).

    Finding them means parsing the model file (seconds for a large one); :func:`load_model`
    records what it found, so asking again about a file it loaded costs nothing."""
    p = Path(path)
    key = _file_key(p)
    if key in _FILES_SEEN:
        return list(_FILES_SEEN[key])
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is still one file
        return [p]
    return _remember_files(p, model)


_FILES_SEEN: dict[tuple, list[Path]] = {}


def _file_key(p: Path) -> tuple | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


def _remember_files(p: Path, model: onnx.ModelProto) -> list[Path]:
    """``p`` and the existing external data files ``model`` (loaded from ``p``, data not yet read) names."""
    files = [p]
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            f = p.parent / loc if loc else None
            if f is not None and f not in files and f.exists():
                files.append(f)
    return _remember(p, files)


def _remember(p: Path, files: list[Path]) -> list[Path]:
    key = _file_key(p)
    if key is not None:
        _FILES_SEEN[key] = list(files)
    return files


def file_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a model including its external data files."""
    return sum(f.stat().st_size for f in model_files(path))


def _save(model: onnx.ModelProto, path: Path, external_name: str | None = None) -> None:
    if not _uses_external_data(model):
        if _format(path) == "protobuf":
            data = serialize_within_limit(model)
            if data is not None:
                path.write_bytes(data)  # what onnx.save_model writes, without sizing the model first
                return
        elif proto_bytes(model) <= PROTOBUF_LIMIT:  # a text format, by the file's extension
            onnx.save_model(model, str(path))
            return
    model = _copy(model)  # onnx's external-data save rewrites the proto in place
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external_name or (path.name + ".data"), size_threshold=1024)


def _format(path: Path) -> str:
    """The format ``onnx.save_model`` picks for ``path`` (by extension; protobuf by default)."""
    return onnx.serialization.registry.get_format_from_file_extension(path.suffix) or "protobuf"


def serialize_within_limit(model: onnx.ModelProto) -> bytes | None:
    """``model`` as protobuf bytes, or None over protobuf's 2 GB limit (it must then be written with
    external data). One pass: asking its size first (``ByteSize``) costs as much as serializing."""
    try:
        data = model.SerializeToString()
    except EncodeError:  # protobuf refuses to serialize a message over 2 GB
        return None
    return data if len(data) <= PROTOBUF_LIMIT else None


def proto_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model``. Protobuf refuses to count a message over 2 GB (EncodeError), so
    a model that large is counted as its weight-free part plus each weight (exact to a few bytes a weight)."""
    try:
        return model.ByteSize()
    except EncodeError:
        pass
    return without_initializers(model).ByteSize() + sum(_tensor_bytes(t) for t in model.graph.initializer)


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """A checked model file's graph without its weights (an external data file is not even read).

    For what needs only the nodes and the real inputs (making feeds, naming kernels) while ONNX
    Runtime holds the weights itself: a second copy of a large model is what runs out of memory.
    Weights listed as graph inputs (IR < 4) are dropped from the inputs with their values.
    """

    model = load_model(path, load_external_data=False)
    light = without_initializers(model)
    del light.graph.input[:]
    light.graph.input.extend(graph_inputs(model))
    return light


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its initializers, made without copying (or serializing) the weights."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    return light


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED  # protobuf 6.x / older
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    try:
        return t.ByteSize() + 6  # + field tag and length prefix
    except EncodeError:  # one tensor over 2 GB: its raw bytes dominate
        return len(t.raw_data) + len(t.name) + 11 * len(t.dims) + 16


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model))


def _check_domains(model: onnx.ModelProto, p: Path) -> None:
    local_functions = {f.domain for f in model.functions}
    unknown = sorted({n.domain for n in model.graph.node} - KNOWN_DOMAINS - local_functions)
    if unknown:
        ops = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain in unknown})
        raise OnnxPruneError(f"{p}: uses operators from unsupported domain(s) {', '.join(unknown)} ({', '.join(ops[:5])})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor (linear ``[NNZ]`` or coordinate ``[NNZ, rank]`` indices)."""
    values = numpy_helper.to_array(sp.values)
    dims = tuple(int(d) for d in sp.dims)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(dims)) if dims else 1, dtype=values.dtype)
    if idx.ndim == 2:
        idx = np.ravel_multi_index(tuple(idx.T), dims) if idx.size else idx.reshape(-1)
    dense[idx.reshape(-1)] = values.reshape(-1)
    return dense.reshape(dims)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (memoized by path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]
