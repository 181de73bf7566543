"""Plain statements on whether a pruning method will make a model faster on a backend.

Zeros in a dense tensor are multiplied like any other value: unstructured sparsity buys size
(mostly compressed size), not latency, on every backend onnxprune profiles. The one hardware path
for weight sparsity is 2:4 on NVIDIA sparse tensor cores (Ampere, compute capability 8.0, and
newer) through TensorRT with sparse weights enabled in fp16/int8. Structured pruning removes whole
channels, so every dense kernel does less work. These notes say so, per backend, so users are not
left to find out by measuring.
"""
from __future__ import annotations

from ..core.errors import OnnxPruneError

#: hardware-profile backend -> how it is named in the notes
BACKENDS = {
    "ort-cpu": "ONNX Runtime CPU",
    "ort-cuda": "ONNX Runtime CUDA",
    "tensorrt": "TensorRT",
    "torch-cpu": "PyTorch CPU",
    "torch-cuda": "PyTorch CUDA",
}
METHODS = ("structured", "unstructured", "nm")
#: first compute capability with sparse tensor cores (Ampere)
SPARSE_TC_MIN_CC = 8.0

_STRUCTURED_HINT = ("what does make it faster: structured pruning (onnxprune prune --structured), which removes whole "
                    "channels so every dense kernel does less work on every backend")
_NM_HINT = ("or 2:4 sparsity (--nm 2:4) run by TensorRT with sparse weights enabled, in fp16 or int8, on an NVIDIA GPU "
            "of the Ampere generation or newer (compute capability >= 8.0)")


def speedup_guidance(method: str, backend: str = "ort-cpu", gpu_compute_capability: float | str | None = None,
                     *, nm: tuple[int, int] | None = None, precision: str | None = None,
                     sparse_weights: bool | None = None) -> list[str]:
    """Statements on the speed ``method`` ("structured", "unstructured", "nm") can bring on ``backend``.

    ``gpu_compute_capability`` (e.g. 8.6 or "8.6"), ``precision`` and ``sparse_weights`` (a hardware
    profile's fields) refine the TensorRT 2:4 note; ``nm`` is the N:M pattern for ``method="nm"``
    (default 2:4).
    """
    if method not in METHODS:
        raise OnnxPruneError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise OnnxPruneError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    where = BACKENDS[backend]
    cc = _cc(gpu_compute_capability)
    if method == "structured":
        return [f"structured pruning makes the dense tensors smaller, so {where} does less work; the latency gain is "
                "usually below the MACs reduction (memory-bound and small layers gain less): measure it with "
                "onnxprune profile",
                "keep channel counts hardware-friendly (--round-to 8, or 16 on AVX-512 CPUs and GPU tensor cores): "
                "odd counts fall off the blocked/vectorized kernels and can end up slower than the dense model"]
    if method == "unstructured":
        if backend == "tensorrt":
            why = ("TensorRT's sparse tensor cores accelerate only the 2:4 pattern, not scattered zeros, so the dense "
                   "kernels still multiply them")
        else:
            why = f"{where} runs Conv/Gemm/MatMul with dense kernels that multiply the zeros like any other weight"
        return [
            f"unstructured sparsity will not make this model faster on {where}: {why}",
            "the gain is size: the zeros compress well (compare gzip_bytes), and --sparse-storage can shrink the "
            "file itself at high sparsity; runtime memory for the weights stays the same",
            f"{_STRUCTURED_HINT}; {_NM_HINT}",
        ]
    # N:M
    n, m = nm or (2, 4)
    pattern = f"{n}:{m}"
    if (n, m) != (2, 4):
        return [
            f"{pattern} sparsity will not make this model faster on {where}: hardware accelerates only 2:4 "
            "(NVIDIA sparse tensor cores); other N:M patterns run as dense weights with zeros",
            "the gain is compressed size only",
            f"{_STRUCTURED_HINT}; {_NM_HINT}",
        ]
    if backend == "tensorrt":
        if cc is None:
            return [
                "2:4 sparsity can be faster on TensorRT only on an NVIDIA GPU of the Ampere generation or newer "
                "(compute capability >= 8.0), with the engine built with sparse weights enabled "
                "(trtexec --sparsity=enable, BuilderFlag.SPARSE_WEIGHTS) in fp16 or int8; this profile does not "
                "state the GPU's compute capability",
                "gains come from large, compute-bound Conv/Gemm layers; measure them with onnxprune profile",
            ]
        if cc < SPARSE_TC_MIN_CC:
            return [
                f"2:4 sparsity will not make this model faster on this GPU (compute capability {cc:g}): sparse "
                "tensor cores need Ampere or newer (compute capability >= 8.0)",
                f"{_STRUCTURED_HINT}",
            ]
        out = [
            f"2:4 sparsity can be faster on TensorRT on this GPU (compute capability {cc:g}) when the engine is built "
            "with sparse weights enabled (trtexec --sparsity=enable, BuilderFlag.SPARSE_WEIGHTS) in fp16 or int8; "
            "fp32 engines do not use sparse tensor cores",
            "gains come from large, compute-bound Conv/Gemm layers and stay well below 2x end to end; "
            "measure them with onnxprune profile",
        ]
        if precision == "fp32":
            out.append("this profile measures fp32, where TensorRT does not use sparse tensor cores: use precision fp16")
        if sparse_weights is False:
            out.append("this profile does not enable sparse weights: set sparse_weights: true to measure the 2:4 gain")
        return out
    if backend == "torch-cuda":
        why = ("PyTorch accelerates 2:4 only for weights converted with torch.sparse.to_sparse_semi_structured, and "
               "the model onnxprune runs keeps dense weights")
    elif backend == "ort-cuda":
        why = "ONNX Runtime CUDA runs Conv/Gemm/MatMul with dense cuDNN/cuBLAS kernels; it does not use sparse tensor cores"
    else:
        why = f"{where} has no sparse tensor cores and runs the zeros as dense weights"
    return [
        f"2:4 sparsity will not make this model faster on {where}: {why}",
        "the gain is compressed size only",
        f"{_STRUCTURED_HINT}; 2:4 pays off with TensorRT (sparse weights enabled, fp16/int8) on an NVIDIA GPU of "
        "the Ampere generation or newer (compute capability >= 8.0)",
    ]


def _cc(value: float | str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise OnnxPruneError(f"GPU compute capability {value!r} is not a number like 8.6") from exc
