"""Backends: one runner per profile backend, each running one inference per call on bound inputs.

| backend      | runs the model through                                   | ``provider`` reported       |
|--------------|----------------------------------------------------------|-----------------------------|
| ``ort-cpu``  | ONNX Runtime, CPUExecutionProvider                       | the first active ORT provider |
| ``ort-cuda`` | ONNX Runtime, CUDAExecutionProvider, I/O bound on the GPU | the first active ORT provider |
| ``tensorrt`` | a TensorRT engine built from the ONNX file               | ``TensorRT <version>``      |
| ``torch-cpu``| the ONNX->torch bridge (:func:`onnxprune.bridge.to_torch`) | ``torch <version> cpu``   |
| ``torch-cuda``| the same module on the GPU                              | ``torch <version> cuda``    |

Every GPU package is imported only when its backend is asked for; when it (or the GPU) is missing
the runner raises :class:`UnavailableError` saying what to install. A runner call returns only when
the inference has finished (GPU runners synchronize), so wall-clock timing around it is honest.
Every CPU-side runtime gets explicit thread counts (:func:`~.environment.resolved_threads`), never
the environment's (Ray sets ``OMP_NUM_THREADS`` in its workers).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from ..core.errors import OnnxPruneError, UnavailableError
from ..core.shapes import _shape_of, graph_inputs
from .environment import resolved_threads
from .hw_profile import HwProfile
from .provider import ORT_PROVIDER, check_active_provider, require_ort_provider
import onnxruntime as ort
from ..core.model_io import load_model
from ..core.normalize import normalize
from ..core.runtime import open_session, session_options


class BatchSizeError(OnnxPruneError):
    """The model cannot run at the requested batch size (its batch dimension is fixed)."""


# ---- inputs ------------------------------------------------------------------------------------
def batch_input_shapes(model: onnx.ModelProto, batch: int, profile_shapes: Mapping[str, tuple[int, ...]] | None = None,
                       overrides: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every model input at ``batch``.

    ``overrides`` (``--input-shape``) win over ``profile_shapes`` (the profile's ``input_shapes``),
    which win over the model's declared shape; dimension 0 is the batch everywhere and becomes
    ``batch``. A symbolic non-batch dimension nobody fixed is an error naming the input; so is a
    batch dimension fixed in the model to another size (:class:`BatchSizeError`).
    """
    overrides, profile_shapes = dict(overrides or {}), dict(profile_shapes or {})
    names = {i.name for i in graph_inputs(model)}
    for source, given in (("--input-shape", overrides), ("the profile's input_shapes", profile_shapes)):
        unknown = sorted(set(given) - names)
        if unknown:
            raise OnnxPruneError(f"{source} names input(s) {unknown}, but the model's inputs are {sorted(names)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for inp in graph_inputs(model):
        declared = _shape_of(inp)
        given = overrides.get(inp.name) or profile_shapes.get(inp.name)
        if given is not None:
            dims: list[int | str | None] = [batch, *given[1:]] if len(given) else []
        elif declared is None:
            raise OnnxPruneError(f"input {inp.name!r} has no declared shape; give it with --input-shape {inp.name}=DIMS")
        else:
            dims = list(declared)
            if dims and not isinstance(dims[0], int):  # symbolic or unknown batch dimension
                dims[0] = batch
            unresolved = [i for i, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
            if unresolved:
                raise OnnxPruneError(f"input {inp.name!r} has symbolic dimension(s) {[declared[i] for i in unresolved]}; "
                                     f"give them with --input-shape {inp.name}=DIMS or the profile's input_shapes")
        if declared is not None and given is not None and len(declared) not in (0, len(dims)):
            raise OnnxPruneError(f"input {inp.name!r} has rank {len(declared)} in the model, but {len(dims)} dims were given")
        if declared and dims and isinstance(declared[0], int) and declared[0] > 0 and declared[0] != batch:
            raise BatchSizeError(f"input {inp.name!r} has a fixed batch dimension of {declared[0]} in the model; "
                                 f"batch size {batch} needs a model exported with a dynamic batch dimension")
        for i, (d_model, d_new) in enumerate(zip(declared or [], dims)):
            if i and isinstance(d_model, int) and d_model > 0 and d_model != d_new:
                raise OnnxPruneError(f"input {inp.name!r}: dimension {i} is fixed to {d_model} in the model, got {d_new}")
        shapes[inp.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return shapes


def make_feeds(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs: standard normal floats, zeros for integers (valid indices), True for bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in graph_inputs(model):
        elem = inp.type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype(np.float32)
        shape = tuple(shapes[inp.name])
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


# ---- helpers -----------------------------------------------------------------------------------
def _import(module: str, what: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UnavailableError(f"{what} needs the Python package {module!r}, which is not installed ({install})") from exc


def _torch_cuda(backend: str) -> Any:
    torch = _import("torch", f"backend {backend}", "pip install torch with CUDA support")
    if not torch.cuda.is_available():
        raise UnavailableError(f"backend {backend} needs an NVIDIA GPU visible to torch "
                               f"(torch {torch.__version__}: torch.cuda.is_available() is False)")
    return torch


def check_available(profile: HwProfile) -> None:
    """Fail fast, before any measuring, when ``profile``'s backend cannot run here (a ``remote``
    profile does not run here: its device checks it)."""
    if profile.remote:
        return
    b = profile.backend
    where = f"profile {profile.name!r}"
    if b in ORT_PROVIDER:
        require_ort_provider(ORT_PROVIDER[b], where)
    elif b == "tensorrt":
        _import("tensorrt", f"{where} (backend tensorrt)", "pip install 'onnxprune[tensorrt]' on a machine with an NVIDIA GPU")
        _torch_cuda(b)
    elif b in ("torch-cpu", "torch-cuda"):
        _import("torch", f"{where} (backend {b})", "pip install 'onnxprune[train]'")
        _bridge(where)
        if b == "torch-cuda":
            _torch_cuda(b)


def _bridge(where: str) -> Callable:
    """The ONNX->torch bridge (torch first: without it, one line and exit 3; the bridge itself is
    onnxprune's own, so a failure to import it is a bug and raises as one)."""
    _import("torch", f"{where} (the torch backends)", "pip install 'onnxprune[train]'")
    from ..bridge import to_torch  # lazy: imports torch

    return to_torch


# ---- ONNX Runtime ------------------------------------------------------------------------------
def ort_session(path: str | os.PathLike, profile: HwProfile, *, arena: bool = True, profiling_prefix: str | None = None):
    """An ONNX Runtime session configured by ``profile`` (threads, provider, arena, optional profiler).

    Raises when the provider the profile asks for is not the one that actually runs.
    """

    provider = ORT_PROVIDER[profile.backend]
    require_ort_provider(provider, f"profile {profile.name!r}")
    intra, inter = resolved_threads(profile)
    so = session_options(intra_op=intra, inter_op=inter, arena=arena, profile_prefix=profiling_prefix)
    providers: list = [provider] if provider == "CPUExecutionProvider" else [(provider, {"device_id": 0}), "CPUExecutionProvider"]
    sess = open_session(path, options=so, providers=providers)
    check_active_provider(sess, provider, f"profile {profile.name!r}")
    return sess


class OrtRunner:
    """ONNX Runtime on CPU (numpy feeds) or CUDA (inputs and outputs bound on the GPU)."""

    def __init__(self, profile: HwProfile, path: str | os.PathLike, feeds: Mapping[str, np.ndarray], *, arena: bool = True):
        self.backend = profile.backend
        self.session = ort_session(path, profile, arena=arena)
        self.provider = self.session.get_providers()[0]
        self.feeds = dict(feeds)
        self.notes: list[str] = []
        self._binding = None
        if self.backend == "ort-cuda":
            binding = self.session.io_binding()
            for name, arr in self.feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
            for out in self.session.get_outputs():
                binding.bind_output(out.name, "cuda", 0)
            self._binding = binding
            self.notes.append("latency excludes host-device copies (inputs and outputs bound on the GPU)")

    def __call__(self) -> None:
        if self._binding is not None:
            self.session.run_with_iobinding(self._binding)  # synchronous: returns when the GPU work is done
        else:
            self.session.run(None, self.feeds)

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self._binding = None
        self.session = None


# ---- TensorRT ----------------------------------------------------------------------------------
class TensorRTRunner:
    """A TensorRT engine built from the ONNX file (fp16 / 2:4 sparse kernels when the profile allows),
    run with ``execute_async_v3`` on device buffers allocated through torch."""

    def __init__(self, profile: HwProfile, path: str | os.PathLike, feeds: Mapping[str, np.ndarray]):
        trt = _import("tensorrt", "backend tensorrt", "pip install 'onnxprune[tensorrt]' on a machine with an NVIDIA GPU")
        torch = _torch_cuda("tensorrt")
        self.backend = "tensorrt"
        self.provider = f"TensorRT {trt.__version__}"
        self.notes: list[str] = ["latency is engine execution only (inputs already on the GPU); engine build time not counted"]
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # default (and deprecated) in TRT 10
        network = builder.create_network(1 << int(explicit) if explicit is not None else 0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise OnnxPruneError(f"{path}: TensorRT cannot parse the model ({errors[:300]})")
        config = builder.create_builder_config()
        if profile.precision == "fp16":
            if not getattr(builder, "platform_has_fast_fp16", True):
                self.notes.append("this GPU has no fast fp16; TensorRT may pick fp32 kernels")
            config.set_flag(trt.BuilderFlag.FP16)
        if profile.sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
            self.notes.append("2:4 sparse kernels allowed (TensorRT uses them only for 2:4-pruned weights on Ampere or newer)")
        opt = builder.create_optimization_profile()
        dynamic = False
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            if any(int(d) < 0 for d in inp.shape):
                dynamic = True
                shape = tuple(feeds[inp.name].shape)
                opt.set_shape(inp.name, shape, shape, shape)
        if dynamic:
            config.add_optimization_profile(opt)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise OnnxPruneError(f"{path}: TensorRT failed to build an engine (see the TensorRT log above)")
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self._buffers = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in inputs:
            arr = np.ascontiguousarray(feeds[name].astype(trt.nptype(self.engine.get_tensor_dtype(name))))
            self.context.set_input_shape(name, arr.shape)
            self._buffers[name] = torch.from_numpy(arr).cuda()
        for name in names:
            if name in inputs:
                continue
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            shape = tuple(self.context.get_tensor_shape(name))
            self._buffers[name] = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, device="cuda")
        for name, buf in self._buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self._stream = torch.cuda.Stream()

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise OnnxPruneError("TensorRT execution failed (see the TensorRT log)")
        self._stream.synchronize()

    def info(self) -> dict[str, Any]:
        size = getattr(self.engine, "device_memory_size_v2", None)
        if size is None:
            size = getattr(self.engine, "device_memory_size", None)
        return {"engine_device_memory_bytes": int(size)} if size is not None else {}

    def close(self) -> None:
        self._buffers.clear()
        self.context = self.engine = None


# ---- PyTorch (through the bridge) --------------------------------------------------------------
class TorchRunner:
    """The model converted with the ONNX->torch bridge, run under ``torch.inference_mode``."""

    def __init__(self, profile: HwProfile, path: str | os.PathLike, feeds: Mapping[str, np.ndarray]):
        torch = _import("torch", f"backend {profile.backend}", "pip install 'onnxprune[train]'")
        to_torch = _bridge(f"profile {profile.name!r}")
        self.backend = profile.backend
        self.notes: list[str] = []
        self._torch = torch
        self._cuda = profile.backend == "torch-cuda"
        if self._cuda:
            _torch_cuda(profile.backend)
        self._threads = torch.get_num_threads()
        torch.set_num_threads(resolved_threads(profile)[0])  # the inter-op pool is fixed once torch has run

        module = to_torch(normalize(load_model(path))).eval()
        device = "cuda" if self._cuda else "cpu"
        module = module.to(device)
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device) for name in module.input_names]
        if profile.precision == "fp16":
            module = module.half()
            tensors = [t.half() if t.is_floating_point() else t for t in tensors]
        self.module, self.inputs = module, tensors
        self.provider = f"torch {torch.__version__} {device}"

    def __call__(self) -> None:
        with self._torch.inference_mode():
            self.module(*self.inputs)
        if self._cuda:
            self._torch.cuda.synchronize()

    def info(self) -> dict[str, Any]:
        return {"torch_cuda_max_allocated_bytes": int(self._torch.cuda.max_memory_allocated())} if self._cuda else {}

    def close(self) -> None:
        self._torch.set_num_threads(self._threads)
        self.module = None


#: backend -> runner class (the table in the module docstring)
RUNNERS: dict[str, Callable[..., Any]] = {
    "ort-cpu": OrtRunner,
    "ort-cuda": OrtRunner,
    "tensorrt": TensorRTRunner,
    "torch-cpu": TorchRunner,
    "torch-cuda": TorchRunner,
}


def make_runner(profile: HwProfile, path: str | os.PathLike, feeds: Mapping[str, np.ndarray], *, arena: bool = True):
    """The runner for ``profile.backend``, already run once on ``feeds`` (``arena`` applies to ONNX
    Runtime's CPU memory arena)."""
    cls = RUNNERS[profile.backend]
    runner = OrtRunner(profile, path, feeds, arena=arena) if cls is OrtRunner else cls(profile, path, feeds)
    try:  # one untimed run, so a model that cannot run on these inputs fails here with one clear line
        runner()
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - every runtime raises its own types
        shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise OnnxPruneError(f"{path}: {profile.backend} cannot run the model on inputs {shapes} ({msg})") from exc
    return runner
