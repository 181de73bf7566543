"""No record lost: ``state.json`` set aside (never overwritten) when it cannot be used, one run per
OUTDIR (a lock), and saves that a SIGKILL at any moment leaves as the old or the new record."""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli, subprocess_env
from onnxprune.core.errors import OnnxPruneError
from onnxprune.pipeline import cache as cache_mod
from onnxprune.pipeline.cache import STATE_VERSION, StepCache, locked

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock semantics are POSIX")

RECIPE = """
name: rec
sweep:
  methods:
    - {name: mag, kind: unstructured, criterion: magnitude, points: [{sparsity: 0.5}, {sparsity: 0.7}]}
  seeds: [0]
retrain: {epochs: 0}
"""


def conv_model(path: Path) -> Path:
    """Conv-Relu-Flatten-Gemm (onnx.helper, no torch): a run on it takes about a second."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((10, 8 * 8 * 8)).astype(np.float32), "G")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "G"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture
def run_args(tmp_path):
    recipe = tmp_path / "rec.yaml"
    recipe.write_text(RECIPE)
    return [str(recipe), str(conv_model(tmp_path / "m.onnx")), "-o", str(tmp_path / "out")]


def _record_one(outdir: Path, name: str, value: str) -> dict:
    def work():
        (outdir / f"{name}.out").write_text(value)
        return {"value": value}
    return StepCache.open(outdir).run(name, {}, work, outputs=[outdir / f"{name}.out"])


def _must_not_run():
    raise AssertionError("a recorded step ran again")


# ------------------------------------------------------------------------------- set aside, never overwritten

@pytest.mark.parametrize("content,why", [
    ("{not json", "cannot be read"),
    (json.dumps({"version": STATE_VERSION + 1, "steps": {"k": {}}}), f"has state version {STATE_VERSION + 1}"),
    (json.dumps(["a", "list"]), "is not a step record"),
])
def test_unusable_state_is_moved_to_the_first_free_bak(tmp_path, capsys, content, why):
    (tmp_path / "state.json.bak-1").write_text("an older backup")
    (tmp_path / "state.json").write_text(content)
    c = StepCache.open(tmp_path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and why in err and "state.json.bak-2" in err
    assert c.warnings == [err[len("warning: "):].strip()]
    assert (tmp_path / "state.json.bak-2").read_text() == content  # the record, byte for byte
    assert (tmp_path / "state.json.bak-1").read_text() == "an older backup"  # an earlier backup is kept
    assert not (tmp_path / "state.json").exists() and c.state == {"version": STATE_VERSION, "steps": {}}
    c.save()  # the next save writes a fresh state.json next to the backups
    assert json.loads((tmp_path / "state.json").read_text())["steps"] == {}
    assert (tmp_path / "state.json.bak-2").read_text() == content


def test_set_aside_without_hard_links_still_keeps_every_backup(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cache_mod.os, "link", no_links)
    for n, content in enumerate(["{one", "{two"], start=1):
        (tmp_path / "state.json").write_text(content)
        assert "state.json.bak-%d" % n in StepCache.open(tmp_path).warnings[0]
    assert [(tmp_path / f"state.json.bak-{n}").read_text() for n in (1, 2)] == ["{one", "{two"]


def test_a_valid_state_is_kept_without_a_word(tmp_path, capsys):
    _record_one(tmp_path, "a", "1")
    c = StepCache.open(tmp_path)
    assert c.warnings == [] and capsys.readouterr().err == ""
    assert c.run("a", {}, _must_not_run, outputs=[tmp_path / "a.out"]) == {"value": "1"}
    assert not list(tmp_path.glob("state.json.bak-*"))


def test_run_of_another_state_version_keeps_the_record_and_says_so(run_args, tmp_path):
    code, out, err = run_cli("run", *run_args)
    assert code == 0, err
    state = tmp_path / "out" / "state.json"
    old = json.loads(state.read_text())
    old["version"] = 99
    state.write_text(json.dumps(old))
    before = state.read_bytes()
    code, out, err = run_cli("run", *run_args, "--json")
    assert code == 0, err
    assert (tmp_path / "out" / "state.json.bak-1").read_bytes() == before
    warn = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "state version 99" in warn[0] and "state.json.bak-1" in warn[0]
    assert any("state.json.bak-1" in n for n in json.loads(out)["notes"])  # in report.json too


# ------------------------------------------------------------------------------------------------ durable

def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        assert Path(src).parent == Path(dst).parent  # same directory: the rename is atomic
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "fsync", fsync)
    monkeypatch.setattr(cache_mod.os, "replace", replace)
    StepCache.open(tmp_path).save()
    assert events == ["fsync file", "replace", "fsync dir"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# A child that records step "b" and stops (SIGSTOP-free: it sleeps) at one point of the save.
_CHILD = textwrap.dedent("""
    import os, stat, sys, time
    from pathlib import Path
    from onnxprune.pipeline import cache
    out, where, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    real = os.fsync
    def fsync(fd):
        real(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode) == (where == "after-rename"):
            marker.write_text("stopped")
            time.sleep(120)
    os.fsync = fsync
    def work():
        (out / "b.out").write_text("2")
        return {"value": "2"}
    cache.StepCache.open(out).run("b", {}, work, outputs=[out / "b.out"])
""")


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended first: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the child never reached the point to kill it at")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("where", ["before-rename", "after-rename"])
def test_sigkill_during_a_save_leaves_the_old_or_the_new_record(tmp_path, where, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _record_one(out, "a", "1")
    old = (out / "state.json").read_bytes()
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), where, str(marker)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(marker, proc)
    _kill(proc)
    state = json.loads((out / "state.json").read_text())  # never a torn file
    steps = sorted(r["step"] for r in state["steps"].values())
    if where == "before-rename":
        assert (out / "state.json").read_bytes() == old and steps == ["a"]
        assert len(list(out.glob(".state.json.*.tmp"))) == 1  # killed with the new record half-way
    else:
        assert steps == ["a", "b"]
    # the next run resumes: no warning, the debris is gone, recorded steps are not run again
    c = StepCache.open(out)
    assert c.warnings == [] and "warning" not in capsys.readouterr().err
    assert not list(out.glob(".state.json.*.tmp"))
    assert c.run("a", {}, _must_not_run, outputs=[out / "a.out"]) == {"value": "1"}
    again = []

    def redo():
        again.append("b")
        (out / "b.out").write_text("2")
        return {"value": "2"}

    assert c.run("b", {}, redo, outputs=[out / "b.out"]) == {"value": "2"}
    assert again == (["b"] if where == "before-rename" else [])


_SAVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from onnxprune.pipeline.cache import StepCache
    c = StepCache.open(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text("saving")
    i = 0
    while True:
        i += 1
        c.state["steps"][f"k{i}"] = {"step": f"s{i}", "files": {}, "result": {"pad": "x" * 20000, "i": i}}
        c.save()
""")


def test_sigkill_at_random_moments_of_continuous_saves(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rng = random.Random(0)
    last = 0
    for attempt in range(4):
        marker = tmp_path / f"m{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(out), str(marker)], env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for(marker, proc)
        time.sleep(rng.uniform(0.05, 0.4))
        _kill(proc)
        c = StepCache.open(out)  # parses, same version: no record set aside
        assert c.warnings == [] and not list(out.glob("state.json.bak-*"))
        n = len(c.state["steps"])
        assert n >= last and set(c.state["steps"]) == {f"k{i}" for i in range(1, n + 1)}
        assert all(r["result"]["i"] == int(k[1:]) for k, r in c.state["steps"].items())
        last = n


# ------------------------------------------------------------------------------------------------ the lock

_HOLDER = textwrap.dedent("""
    import sys
    from onnxprune.pipeline.cache import locked
    with locked(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")


def test_locked_refuses_another_process_in_one_line_and_nests_in_one(tmp_path):
    with locked(tmp_path), locked(tmp_path):  # the same process (demo around run): re-entrant
        pass
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OnnxPruneError, match="another onnxprune run is using this directory") as exc:
            with locked(tmp_path):
                pass
        assert "\n" not in str(exc.value)
    finally:
        holder.communicate("", timeout=30)
    with locked(tmp_path):  # released: the next run goes ahead
        pass


# A real `onnxprune run` that stops for good while saving the record of its third step.
_STOPPED_RUN = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from onnxprune.pipeline import cache
    marker, real, calls = Path(sys.argv[1]), cache.write_durable, []
    def slow(path, data):
        calls.append(path)
        if len(calls) == 3:
            os.replace = lambda *a: (marker.write_text("stopped"), time.sleep(120))
        real(path, data)
    cache.write_durable = slow
    from onnxprune.cli import main
    main(sys.argv[2:])
""")


def test_a_concurrent_run_is_refused_and_a_killed_run_resumes(run_args, tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_RUN, str(marker), "run", *run_args],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(marker, proc, 120)
        saved = (out / "state.json").read_bytes()
        assert len(json.loads(saved)["steps"]) == 2
        code, _, err = run_cli("run", *run_args)  # a second run while the first holds OUTDIR
        assert code == 1 and err.count("\n") == 1 and "another onnxprune run is using this directory" in err
        assert (out / "state.json").read_bytes() == saved and not (out / "report.json").exists()
    finally:
        _kill(proc)
    code, stdout, err = run_cli("run", *run_args, "--json")  # the kernel dropped the dead run's lock
    assert code == 0, err
    assert "warning" not in err and not list(out.glob(".state.json.*.tmp"))
    report = json.loads(stdout)
    assert report["steps"]["skipped"] == 2 and report["steps"]["executed"] >= 1
