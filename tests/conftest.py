import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def run_ort(model_or_path, feeds: dict) -> list[np.ndarray]:
    """Run a model (path or ModelProto) in ONNX Runtime CPU."""
    src = model_or_path if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model, shapes: dict | None = None, seed: int = 0) -> dict:
    """Random inputs for every graph input (symbolic dims -> 1, or as given in ``shapes``)."""
    from onnxprune.core.shapes import graph_inputs
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in graph_inputs(model):
        dims = (shapes or {}).get(inp.name) or [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.fixture
def ort_run():
    return run_ort


@pytest.fixture
def feeds_for():
    return random_feeds


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is fastest and immune to a busy machine's spin-waits."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
