"""``run --executor ray``: the same sweep as the local executor, a crashed worker retried, a failing
point reported (not retried) while the others finish, a re-run that finishes only what is missing, a
worker of another version refused before any work, latency tasks holding their whole node with
explicit thread counts, and exit 3 without Ray. The Ray tests start one local Ray instance for the
module (2 CPUs, no dashboard)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_util import run_cli, subprocess_env
from onnxprune.core.errors import OnnxPruneError

RECIPE = """
name: raytiny
sweep:
  methods:
    - {name: l1, kind: structured, criterion: l1, scope: global, points: [{ratio: 0.5}]}
    - {name: mag, kind: unstructured, criterion: magnitude, points: [{sparsity: 0.6}]}
  seeds: [0]
retrain: {epochs: 1, batch_size: 64, lr: 0.05, train_bn: true}
data: digits
hw: [ci-cpu]
evaluation: {splits: [val, test]}
profiling: {min_runs: 3, warmup_runs: 1, min_duration_s: 0.0, memory: false}
"""
#: steps of one retrained point: prune, retrain, figures, evaluate, profile, speedup-vs-dense
POINT_STEPS = 6
FAULTS_ENV = "ONNXPRUNE_TEST_FAULTS"


def inject_faults() -> None:
    """Ray worker setup hook: ``prune_stage`` fails as the JSON file named by $ONNXPRUNE_TEST_FAULTS says,
    per target label: "crash-once" kills the worker process once, "raise" raises a ValueError (bad
    data) every time (attempts are counted in the file), "hang" waits a minute (without its CPU). Every latency
    task appends the Ray resources it holds to ``held.jsonl`` beside that file."""
    from onnxprune.pipeline import steps, work

    real = steps.prune_stage
    real_latency = work.measure_latency

    def measure_latency(*args, **kw):
        import ray

        held = Path(os.environ.get(FAULTS_ENV, "/nonexistent")).with_name("held.jsonl")
        with held.open("a") as f:
            f.write(json.dumps(ray.get_runtime_context().get_assigned_resources()) + "\n")
        return real_latency(*args, **kw)

    work.measure_latency = measure_latency

    def prune_stage(source, stage, seed, **kw):
        path = Path(os.environ.get(FAULTS_ENV, "/nonexistent"))
        faults = json.loads(path.read_text()) if path.is_file() else {}
        label = stage.target.label() if stage.target is not None else ""
        action = faults.get(label)
        if action == "hang":  # blocked in ray.wait, the task lends its CPU back: the node can still measure
            import ray

            never = ray.remote(lambda: None).options(num_cpus=0, resources={"onnxprune_test_never": 1}).remote()
            ray.wait([never], timeout=60)
        if action in ("crash-once", "raise"):
            faults[f"{label} attempts"] = faults.get(f"{label} attempts", 0) + 1
            if action == "crash-once":
                faults[label] = "crashed"
            path.write_text(json.dumps(faults))
            if action == "crash-once":
                os._exit(1)
            raise ValueError(f"injected failure at {label}")
        return real(source, stage, seed, **kw)

    steps.prune_stage = prune_stage


def worker_env(faults: Path) -> dict:
    """The runtime_env of every driver here: workers import this checkout and read the fault file."""
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]), FAULTS_ENV: str(faults)}
    return {"env_vars": env, "worker_process_setup_hook": inject_faults}


@pytest.fixture(scope="module")
def ray_faults(tmp_path_factory):
    """One local Ray instance for the module; yields the fault-injection file its workers read."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'onnxprune[ray]'")
    from onnxprune.pipeline.executor import PROFILE_RESOURCE

    faults = tmp_path_factory.mktemp("faults") / "faults.json"
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
             resources={PROFILE_RESOURCE: 1},
             runtime_env=worker_env(faults), log_to_driver=False)
    yield faults
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A small trained digits CNN, the recipe and the local executor's report."""
    from onnxprune.commands.demo_model import train_demo_model
    from onnxprune.pipeline.run import run_recipe

    d = tmp_path_factory.mktemp("raysweep")
    train_demo_model(d / "m.onnx", epochs=5, width=8)
    (d / "r.yaml").write_text(RECIPE)
    local = run_recipe(d / "r.yaml", d / "m.onnx", d / "local")
    return d, d / "m.onnx", d / "r.yaml", local


def figures(point):
    return point["params"], point["nonzero_params"], point["macs"]


def top1(point):
    return {s: a["top1"]["mean"] for s, a in point["accuracy"].items()}


@pytest.mark.slow
def test_ray_sweep_matches_local_despite_a_crashed_worker(ray_faults, sweep):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe, local = sweep
    ray_faults.write_text(json.dumps({"ratio0.5": "crash-once"}))
    held = ray_faults.with_name("held.jsonl")
    held.unlink(missing_ok=True)
    rep = run_recipe(recipe, model, d / "ray", executor="ray")
    assert json.loads(ray_faults.read_text())["ratio0.5 attempts"] == 1  # the worker did die, and Ray retried
    # every latency task (dense, two points) held the whole 2-CPU node and its measuring slot
    assert [json.loads(line) for line in held.read_text().splitlines()] == [{"CPU": 2.0, "onnxprune_profile": 1.0}] * 3
    assert [p["id"] for p in rep["points"]] == [p["id"] for p in local["points"]] == ["l1-ratio0.5", "mag-sparsity0.6"]
    for a, b in zip(local["points"] + [local["dense"]], rep["points"] + [rep["dense"]]):
        assert figures(a) == figures(b), a["id"]
        # Ray gives each task one thread: float sums may differ in the last bits, never by a whole sample
        for split, acc in top1(a).items():
            assert abs(acc - top1(b)[split]) <= 1.0 / rep["data"]["samples"][split] + 1e-12, (a["id"], split)
        assert b["profiles"]["ci-cpu"][0]["nodes"] and set(b["profiles"]["ci-cpu"][0]["nodes"][0]) == {"host", "cpu", "gpu"}
        assert set(a["profiles"]["ci-cpu"][0]) == set(b["profiles"]["ci-cpu"][0])
    assert top1(rep["points"][1])["val"] > 0.5  # a trained model, so equal accuracies say something
    assert rep["steps"]["executed"] == local["steps"]["executed"] and set(rep) == set(local)
    for p in rep["points"]:
        assert (d / "ray" / p["models"][0]).is_file() and p["runs"][0]["train"]["best_epoch"] == 1
    # the results are in OUTDIR's step cache: Ray again, or the local executor, runs nothing
    again = run_recipe(recipe, model, d / "ray", executor="ray")
    assert again["steps"]["executed"] == 0 and again["steps"]["skipped"] == rep["steps"]["executed"]
    assert run_recipe(recipe, model, d / "ray")["steps"]["executed"] == 0


@pytest.mark.slow
def test_failing_point_is_reported_and_a_rerun_finishes_only_it(ray_faults, sweep, tmp_path):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe, local = sweep
    out = tmp_path / "run"
    ray_faults.write_text(json.dumps({"sparsity0.6": "raise"}))
    code, _, err = run_cli("run", recipe, model, "-o", out, "--executor", "ray", "--set", "executor.max_retries=1",
                             "--json")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "1 of 3 jobs failed" in err and "mag-sparsity0.6-s0: ValueError: injected failure at sparsity0.6" in err
    assert json.loads(ray_faults.read_text())["sparsity0.6 attempts"] == 1  # bad data: not retried (max_retries=1)
    assert not (out / "report.json").exists()
    assert (out / "models" / "l1-ratio0.5-s0.onnx").is_file()  # the other point finished and was written back
    assert not (out / "models" / "mag-sparsity0.6-s0.onnx").exists()
    ray_faults.write_text("{}")
    rep = run_recipe(recipe, model, out, executor="ray")
    assert rep["steps"]["executed"] == POINT_STEPS  # only the missing point's steps
    assert rep["steps"]["skipped"] == local["steps"]["executed"] - POINT_STEPS
    assert [figures(p) for p in rep["points"]] == [figures(p) for p in local["points"]]


def test_executor_without_ray_exits_3_with_the_install_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    (tmp_path / "r.yaml").write_text(RECIPE)
    code, _, err = run_cli("run", tmp_path / "r.yaml", tmp_path / "m.onnx", "-o", tmp_path / "o", "--executor", "ray")
    assert code == 3 and "pip install 'onnxprune[ray]'" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_executor_settings_in_recipe_and_flags():
    from onnxprune.pipeline.executor import LocalExecutor, make_executor
    from onnxprune.recipes import load_recipe, validate_recipe

    base = {"stages": [{"kind": "structured", "target": {"ratio": 0.5}}]}
    assert validate_recipe({**base, "executor": "ray"}, "r").executor.kind == "ray"
    cfg = validate_recipe({**base, "executor": {"kind": "ray", "address": "head:6379", "max_retries": 0}}, "r").executor
    assert (cfg.address, cfg.max_retries) == ("head:6379", 0)
    with pytest.raises(OnnxPruneError, match="executor"):
        validate_recipe({**base, "executor": "dask"}, "r")
    assert load_recipe("demo").executor.kind == "local"
    assert isinstance(make_executor(cfg, kind="local"), LocalExecutor)
    with pytest.raises(OnnxPruneError, match="--ray-address needs --executor ray"):
        make_executor(cfg, kind="local", address="head:6379")


def test_unreachable_ray_address_fails_before_any_work():
    import socket

    from onnxprune.pipeline.executor import check_reachable

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OnnxPruneError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(OnnxPruneError, match="expected HOST:PORT"):
        check_reachable("nonsense")
    check_reachable("auto")  # Ray finds a cluster started on this machine itself


def test_ray_cluster_without_the_profile_resource_is_refused():
    from onnxprune.pipeline.executor import RayExecutor
    from onnxprune.recipes import validate_recipe

    class Cluster:  # what ray.cluster_resources() says of a cluster started without --resources
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0}

    class Ctx:
        recipe = validate_recipe({"stages": [{"kind": "structured", "target": {"ratio": 0.5}}]}, "r")
        profiles = ["ci-cpu"]

    with pytest.raises(OnnxPruneError, match="onnxprune_profile.*ray start"):
        RayExecutor()._needs(Cluster, Ctx)
    Ctx.recipe = validate_recipe({"stages": [{"kind": "structured", "target": {"ratio": 0.5}}],
                                  "retrain": {"epochs": 1, "device": "cuda"}}, "r")
    with pytest.raises(OnnxPruneError, match="no GPU"):
        RayExecutor()._needs(Cluster, Ctx)


DRIVER = """
import sys, ray
from test_ray_executor import worker_env
from pathlib import Path
address, faults, recipe, model, out = sys.argv[1:]
ray.init(address=address, runtime_env=worker_env(Path(faults)), log_to_driver=False)
from onnxprune.pipeline.run import run_recipe
run_recipe(recipe, model, out, executor="ray")
"""


@pytest.mark.slow
def test_killed_driver_loses_no_finished_point(ray_faults, sweep, tmp_path):
    """A driver killed while one point hangs: the finished point and the dense control are in the cache,
    and a re-run runs only the point that was in flight."""
    import ray

    from onnxprune.pipeline.run import run_recipe

    d, model, recipe, local = sweep
    out = tmp_path / "run"
    ray_faults.write_text(json.dumps({"sparsity0.6": "hang"}))
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
    args = [ray.get_runtime_context().gcs_address, ray_faults, recipe, model, out]
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else {"steps": {}}
            names = [r["step"] for r in state["steps"].values()]
            if names.count("profile") >= 2 and "speedup-vs-dense" in names:  # dense and l1 measured: l1 is done
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    ray_faults.write_text("{}")
    assert (out / "models" / "l1-ratio0.5-s0.onnx").is_file() and not (out / "report.json").exists()
    rep = run_recipe(recipe, model, out, executor="ray")
    assert rep["steps"]["executed"] == POINT_STEPS
    assert [figures(p) for p in rep["points"]] == [figures(p) for p in local["points"]]


@pytest.mark.slow
def test_worker_of_another_version_is_refused_before_any_work(ray_faults, sweep, tmp_path, monkeypatch):
    from onnxprune.core import version
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe, local = sweep
    ray_faults.write_text(json.dumps({"ratio0.5": "raise"}))  # counts an attempt if pruning ever starts
    monkeypatch.setattr(version, "__version__", "0.0.0-driver")  # the driver's version; the workers keep theirs
    with pytest.raises(OnnxPruneError, match=r"3 of 3 jobs failed.*runs onnxprune .*the driver 0\.0\.0-driver"):
        run_recipe(recipe, model, tmp_path / "run", executor="ray")
    assert "ratio0.5 attempts" not in json.loads(ray_faults.read_text())  # refused at the start, not after the work
    assert not (tmp_path / "run" / "models" / "l1-ratio0.5-s0.onnx").exists()
    ray_faults.write_text("{}")


def test_task_checks_the_version_first():
    from onnxprune.pipeline.executor import Job, Shared, run_task

    shared = Shared(recipe=None, data=None, data_desc=None, profiles=[], sens=None, dense={}, records={}, version="0.0.0-x")
    res = run_task(shared, Job("dense", "dense"), "latency", {"files": {}}, None)  # would crash if it did any work
    assert "runs onnxprune" in res["error"] and "the driver 0.0.0-x" in res["error"]


def test_measure_options_reserve_the_whole_node():
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'onnxprune[ray]'")
    from onnxprune.pipeline.executor import PROFILE_RESOURCE, measure_options, measuring_nodes

    a, b, c, d, e = (f"{i:02x}" * 28 for i in range(1, 6))  # node ids are 28-byte hex strings
    nodes = measuring_nodes([
        {"NodeID": a, "Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0, PROFILE_RESOURCE: 1.0}},
        {"NodeID": b, "Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0, PROFILE_RESOURCE: 1.0}},
        {"NodeID": c, "Alive": True, "Resources": {"CPU": 64.0}},  # trains, never measures
        {"NodeID": d, "Alive": False, "Resources": {"CPU": 8.0, PROFILE_RESOURCE: 1.0}},
    ])
    assert [n["node_id"] for n in nodes] == [a, b]
    assert measure_options(nodes, gpu=False, index=1) == {"num_cpus": 16, "num_gpus": 0, "resources": {PROFILE_RESOURCE: 1}}
    assert measure_options(nodes, gpu=True, index=0)["num_gpus"] == 1
    # nodes of different sizes: each task pinned to one node and sized to it
    nodes.append({"node_id": e, "cpus": 4, "gpus": 0})
    opts = [measure_options(nodes, gpu=False, index=i) for i in range(4)]
    assert [o["num_cpus"] for o in opts] == [16, 16, 4, 16]
    assert [o["scheduling_strategy"].node_id for o in opts] == [a, b, e, a]
    assert not any(o["scheduling_strategy"].soft for o in opts)


def _threads_in_runners(profile_yaml: str, model: str) -> dict:
    """The thread counts the ORT and torch runners use for a profile with intra_op 0, and the ones
    :func:`resolved_threads` promises, in this process."""
    import torch

    from onnxprune.profiling.environment import resolved_threads
    from onnxprune.profiling.hw_profile import load_hw_profile
    from onnxprune.profiling.runners import OrtRunner, TorchRunner

    prof = load_hw_profile(profile_yaml)
    feeds = {"input": __import__("numpy").zeros((1, 3, 16, 16), "float32")}
    ort_runner = OrtRunner(prof, model, feeds)
    torch_runner = TorchRunner(prof.model_copy(update={"backend": "torch-cpu"}), model, feeds)
    out = {"omp": os.environ.get("OMP_NUM_THREADS"), "resolved": list(resolved_threads(prof)),
           "ort": [ort_runner.session.get_session_options().intra_op_num_threads,
                   ort_runner.session.get_session_options().inter_op_num_threads],
           "torch": torch.get_num_threads()}
    torch_runner.close()
    return out


@pytest.fixture(scope="module")
def all_cores_profile(tmp_path_factory):
    import zoo

    d = tmp_path_factory.mktemp("threads")
    (d / "p.yaml").write_text("name: allcores\nbackend: ort-cpu\nthreads: {intra_op: 0, inter_op: 0}\n")
    return str(d / "p.yaml"), str(zoo.export("tiny_resnet", d))


def test_threads_are_explicit_not_inherited_from_omp(all_cores_profile, monkeypatch):
    """OMP_NUM_THREADS=1 (what Ray gives its workers) and torch at one thread: a profile with
    intra_op 0 still runs on every usable physical core, in ONNX Runtime and in torch."""
    import torch

    from onnxprune.profiling import environment

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(environment, "physical_cores", lambda: 3)
    monkeypatch.setattr(environment, "usable_cores", lambda: [0, 1, 2, 3])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = _threads_in_runners(*all_cores_profile)
    finally:
        torch.set_num_threads(before)
    assert got["resolved"] == [3, 3] and got["ort"] == [3, 3] and got["torch"] == 3


@pytest.mark.slow
def test_threads_in_a_ray_worker_follow_the_profile(ray_faults, all_cores_profile):
    import ray

    task = ray.remote(_threads_in_runners).options(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    got = ray.get(task.remote(*all_cores_profile))
    assert got["omp"] == "1" and got["resolved"][0] >= 1
    assert got["ort"] == got["resolved"] and got["torch"] == got["resolved"][0]
