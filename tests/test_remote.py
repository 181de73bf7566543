"""Profiling on a device over SSH, through a real OpenSSH server on 127.0.0.1.

The test starts ``sshd`` (Debian's openssh-server) as a child on a free port with a throwaway host
key and authorized key, and uses this machine as the "device": its Python with PYTHONPATH set to
this checkout and a ``torch`` that fails to import, as on a board with only ``pip install onnxprune``
(``remote_python``). Skipped, with the reason, only where sshd is not installed.
"""
from __future__ import annotations

import base64
import contextlib
import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import torch
import yaml

import zoo
from cli_util import run_cli, subprocess_env
from onnxprune import __version__
from onnxprune.core.errors import OnnxPruneError, UnavailableError
from onnxprune.core.model_io import file_sha256
from onnxprune.profiling import compare_models, profile_model, remote, ssh_target
from onnxprune.profiling.hw_profile import profile_from_dict
from onnxprune.bridge.torch_export import export_torch

ROOT = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)
NO_SSHD = None if SSHD and shutil.which("ssh") and shutil.which("ssh-keygen") else \
    "OpenSSH server not installed (apt-get install openssh-server)"
FAST = {"name": "fast", "backend": "ort-cpu", "threads": {"intra_op": 1}, "warmup_runs": 1, "min_runs": 5,
        "min_duration_s": 0.02}
DEVICE_KEYS = {"target", "host", "platform", "arch", "cpu_model", "cpu_cores", "memory_bytes", "onnxruntime", "providers",
               "python", "onnxprune", "workdir", "model_copied"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_python(path: Path, pythonpath: str | None, *args: str) -> str:
    """A wrapper script at ``path`` that runs this Python with ``PYTHONPATH`` (and ``args``) set: what a
    device's venv python is to remote_python, which takes a path and never a shell fragment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    env = f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath is not None else ""
    path.write_text(f"#!/bin/sh\n{env}exec {shlex.join([sys.executable, *args])} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True)


class Sshd:
    def __init__(self, d: Path):
        self.dir = d
        for name in ("host_key", "client_key", "other_key"):
            _keygen(d / name)
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        self.port = _free_port()
        (d / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}", "StrictModes no", "PidFile none", "UsePAM no",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp", ""]))
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {(d / 'host_key.pub').read_text()}")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory, as its service makes it
        self.log = open(d / "sshd.log", "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=self.log, stderr=self.log)
        self.target = f"{getpass.getuser()}@127.0.0.1:{self.port}"
        self.options = [f"IdentityFile={d / 'client_key'}", "IdentitiesOnly=yes", f"UserKnownHostsFile={d / 'known_hosts'}"]
        no_torch = d / "no_torch" / "torch"  # the device has no torch (pip install onnxprune, nothing more)
        no_torch.mkdir(parents=True)
        (no_torch / "__init__.py").write_text("raise ImportError('torch is not installed on this device')\n")
        # remote_python is a path, here one with a space in it (a venv under "my venv" must work)
        self.python = device_python(d / "my venv" / "bin" / "python", f"{ROOT}:{no_torch.parent}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            argv = ssh_target.ssh_argv(ssh_target.parse_target(self.target), self.options, "true")
            if subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"sshd did not start: {(self.dir / 'sshd.log').read_text()[-500:]}")

    def profile(self, **extra) -> dict:
        return {**FAST, "remote": self.target, "remote_python": self.python, "ssh_options": self.options, **extra}

    def agents(self) -> list[psutil.Process]:
        """The agent processes this server's sessions started."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in kids if _is_agent(p)]

    def drop_connections(self) -> None:
        """Kill every per-connection sshd process: the connection dies as when a device goes away."""
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if p.name() == "sshd":
                    p.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        self.drop_connections()
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def _is_agent(p: psutil.Process) -> bool:
    try:
        return "onnxprune.profiling.remote_agent" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def _workdir(agent: psutil.Process) -> Path:
    """The device directory an agent works in (from its base64 request)."""
    return Path(json.loads(base64.b64decode(" ".join(agent.cmdline()).split()[-1]))["workdir"])


def _gone(procs: list[psutil.Process], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if NO_SSHD:
        pytest.skip(NO_SSHD)
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote_models")
    a, b = d / "wide.onnx", d / "narrow.onnx"
    export_torch(zoo.ConvChain(c=16).eval(), (torch.randn(1, 3, 16, 16),), a)
    export_torch(zoo.ConvChain(c=4).eval(), (torch.randn(1, 3, 16, 16),), b)
    return {"a": a, "b": b, "dir": d}


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------- transport

def test_targets_parse_and_refuse_option_lookalikes():
    assert str(ssh_target.parse_target("pi@board.local:2222")) == "pi@board.local:2222"
    t = ssh_target.parse_target("[::1]:22")
    assert (t.user, t.host, t.port, t.scp_path("/tmp/x")) == (None, "::1", 22, "[::1]:/tmp/x")
    assert ssh_target.parse_target("jetson").destination == "jetson"  # a ~/.ssh/config alias
    for bad in ("-oProxyCommand=x", "pi@", "pi@host:0", "pi@host:70000", "a b"):
        with pytest.raises(ValueError, match="USER@HOST"):
            ssh_target.parse_target(bad)


def test_hw_profile_and_remote_share_ssh_target_and_do_not_import_each_other():
    import ast

    for mod, other in (("hw_profile", "remote"), ("remote", "hw_profile")):
        tree = ast.parse((ROOT / "onnxprune" / "profiling" / f"{mod}.py").read_text())
        imported = {(n.module or "") + ":" + ",".join(a.name for a in n.names) for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert not any(i.split(":")[0] == other or other in i.split(":")[1].split(",") for i in imported), (mod, imported)
        assert any(i.startswith("ssh_target:") for i in imported)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
def test_batchmode_cannot_be_overridden_and_user_options_win_over_defaults():
    """``ssh -G`` prints the options ssh would use, without connecting."""
    argv = ssh_target.ssh_argv(ssh_target.parse_target("pi@board:2222"), ["BatchMode=no", "ConnectTimeout=3"], "true")
    effective = subprocess.run([argv[0], "-G", *argv[1:-1]], capture_output=True, text=True, check=True).stdout.splitlines()
    assert {"batchmode yes", "connecttimeout 3", "serveraliveinterval 5", "port 2222", "user pi"} <= set(effective)
    scp = ssh_target.scp_argv(ssh_target.parse_target("pi@board:2222"), [], "m.onnx", "/tmp/d/x.onnx")
    assert scp[-3:] == ["--", str(Path("m.onnx").resolve()), "pi@board:/tmp/d/x.onnx"] and scp[scp.index("-P") + 1] == "2222"
    assert argv[-3:] == ["--", "pi@board", "true"]


# ------------------------------------------------------------------------------------------- results

def test_remote_profile_has_the_form_of_a_local_one(sshd, models):
    emulated = {"provenance": "emulated", "emulates": "a board"}
    local = profile_model(models["a"], [profile_from_dict({**FAST, **emulated})], memory=False)
    res = profile_model(models["a"], [profile_from_dict(sshd.profile(**emulated))], memory=False)
    rec, loc = res["results"][0], local["results"][0]
    assert set(rec) - {"remote"} == set(loc) and set(res) == set(local)
    assert res["model"] == str(models["a"]) and res["macs"] == local["macs"] and rec["params"] == loc["params"]
    assert loc["provenance"] == "emulated" and rec["provenance"] == "real"  # measured on the device itself
    assert any("over SSH" in n for n in rec["notes"])
    assert rec["latency_ms"]["p50"] > 0 and rec["runs"] >= 5
    dev = rec["remote"]
    assert set(dev) == DEVICE_KEYS and dev["target"] == sshd.target and dev["onnxprune"] == __version__
    assert dev["host"] == socket.gethostname() and dev["cpu_cores"] == os.cpu_count()
    assert "CPUExecutionProvider" in dev["providers"] and dev["memory_bytes"] > 0
    assert dev["model_copied"] == {str(models["a"]): True}
    assert not Path(dev["workdir"]).exists()  # removed when the call ended
    assert not sshd.agents()


def test_sha256_skip_within_a_session_and_clean_up_after(sshd, models):
    prof = profile_from_dict(sshd.profile())
    with remote.sessions():
        first = profile_model(models["a"], [prof], memory=False)["results"][0]["remote"]
        workdir = Path(first["workdir"])
        assert [p.name for p in workdir.glob("*/*.onnx")] == [f"{file_sha256(models['a'])}.onnx"]
        cmp = compare_models(models["a"], models["b"], prof)
        assert workdir.is_dir()
    assert first["model_copied"] == {str(models["a"]): True} and cmp["remote"]["workdir"] == str(workdir)
    # compare on the device: both models there, A already was; timed interleaved in one process
    assert cmp["remote"]["model_copied"] == {str(models["a"]): False, str(models["b"]): True}
    assert cmp["interleaved"] is True and cmp["provenance"] == "real"
    assert cmp["a"]["model"] == str(models["a"]) and cmp["ratios"]["macs_reduction"] > 1
    assert cmp["comparisons"][0]["a"]["runs"] == cmp["comparisons"][0]["b"]["runs"] >= 5
    assert not workdir.exists()


def test_a_file_with_the_wrong_bytes_under_the_hash_name_is_copied_again(sshd, models):
    prof = profile_from_dict(sshd.profile())
    session = remote.session_for(prof)
    try:
        with remote.sessions():
            dest, copied = session.upload([models["a"]])[models["a"]]
            Path(dest).write_bytes(b"truncated")
            dest2, copied2 = session.upload([models["a"]])[models["a"]]
            assert (copied, copied2, dest2) == (True, True, dest)
            assert file_sha256(dest) == file_sha256(models["a"])
    finally:
        remote.close_all()


def test_cli_profile_and_compare_with_remote_flags(sshd, models, tmp_path):
    hw = tmp_path / "board.yaml"
    hw.write_text(yaml.safe_dump({**FAST, "name": "board", "remote_python": sshd.python}))
    opts = [a for o in sshd.options for a in ("--ssh-option", o)]
    code, out, err = run_cli("profile", models["b"], "--hw", hw, "--remote", sshd.target, *opts, "--no-memory")
    assert code == 0, err
    flat = " ".join(out.split())  # rich wraps lines at the terminal width
    assert "board: ort-cpu fp32" in flat and "provenance real" in flat and f"on {sshd.target} ({socket.gethostname()})" in flat
    code, out, err = run_cli("compare", models["a"], models["b"], "--hw", hw, "--remote", sshd.target, *opts, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["remote"]["target"] == sshd.target and res["profile"] == "board" and res["b"]["model"] == str(models["b"])


def test_bad_remote_and_option_values_are_one_line(models):
    code, _, err = run_cli("profile", models["a"], "--remote", "pi@host:99999", "--no-memory")
    assert code == 1 and "USER@HOST[:PORT]" in _one_error_line(err)
    code, _, err = run_cli("profile", models["a"], "--remote", "pi@host", "--ssh-option", "NoValue", "--no-memory")
    assert code == 1 and "KEY=VALUE" in _one_error_line(err)
    with pytest.raises(OnnxPruneError, match="remote"):
        profile_from_dict({**FAST, "remote": "-oProxyCommand=x"})


# -------------------------------------------------------------------------------------------- faults

def test_refused_key_and_unknown_host_exit_3_in_one_line(sshd, models, tmp_path):
    hw = tmp_path / "board.yaml"
    hw.write_text(yaml.safe_dump({**FAST, "remote_python": sshd.python}))
    known = f"UserKnownHostsFile={sshd.dir / 'known_hosts'}"
    code, _, err = run_cli("profile", models["a"], "--hw", hw, "--remote", sshd.target, "--no-memory",
                           "--ssh-option", f"IdentityFile={sshd.dir / 'other_key'}", "--ssh-option", "IdentitiesOnly=yes",
                           "--ssh-option", known)
    line = _one_error_line(err)
    assert code == 3 and "Permission denied" in line and "IdentityFile" in line
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    code, _, err = run_cli("profile", models["a"], "--hw", hw, "--remote", sshd.target, "--no-memory",
                           "--ssh-option", f"UserKnownHostsFile={empty}", "--ssh-option", "StrictHostKeyChecking=yes",
                           *[a for o in sshd.options[:2] for a in ("--ssh-option", o)])
    assert code == 3 and "Host key verification failed" in _one_error_line(err)


def test_version_mismatch_names_both_versions(sshd, models, tmp_path):
    other = tmp_path / "other" / "onnxprune"  # a device with another onnxprune release installed
    other.mkdir(parents=True)
    (other / "__init__.py").write_text('__version__ = "0.0.1-device"\n')
    prof = profile_from_dict(sshd.profile(remote_python=device_python(tmp_path / "other_python", str(other.parent))))
    with pytest.raises(UnavailableError, match=rf"version mismatch: {__version__} here, 0\.0\.1-device on the device"):
        profile_model(models["a"], [prof], memory=False)
    no_site = profile_from_dict(sshd.profile(remote_python=device_python(tmp_path / "no_site", None, "-S")))  # no onnxprune
    with pytest.raises(UnavailableError, match="onnxprune is not installed"):
        profile_model(models["a"], [no_site], memory=False)


@contextlib.contextmanager
def _profile_cli(sshd: Sshd, model: Path, hw: Path) -> Iterator[subprocess.Popen]:
    """``onnxprune profile`` in a child process, killed should the test fail first."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune", "profile", str(model), "--hw", str(hw), "--no-memory"],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _wait_for_agents(sshd: Sshd, proc: subprocess.Popen, timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = sshd.agents()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"the agent never started on the device: {proc.communicate()[1] if proc.poll() is not None else ''}")


def test_dropped_connection_is_one_line_and_leaves_nothing_running(sshd, models, tmp_path):
    hw = tmp_path / "slow.yaml"
    hw.write_text(yaml.safe_dump(sshd.profile(min_duration_s=120, min_runs=10**9)))
    with _profile_cli(sshd, models["a"], hw) as proc:
        agents = _wait_for_agents(sshd, proc)
        workdir = _workdir(agents[0])
        sshd.drop_connections()
        _, err = proc.communicate(timeout=60)
    line = _one_error_line(err)
    assert proc.returncode == 3 and f"remote {sshd.target}" in line
    assert _gone(agents), "the agent outlived its connection"
    assert not workdir.exists()


def test_local_side_killed_leaves_nothing_running(sshd, models, tmp_path):
    hw = tmp_path / "slow.yaml"
    hw.write_text(yaml.safe_dump(sshd.profile(min_duration_s=120, min_runs=10**9)))
    with _profile_cli(sshd, models["a"], hw) as proc:
        agents = _wait_for_agents(sshd, proc)
        workdir = _workdir(agents[0])
        assert workdir.is_dir()
        proc.send_signal(signal.SIGKILL)  # the host dies: its ssh child sees stdin EOF, the agent the channel's EOF
        proc.wait(10)
    assert _gone(agents), "the agent outlived the host process"
    deadline = time.monotonic() + 5
    while workdir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not workdir.exists(), "the agent left the model copies behind"


def test_timeout_kills_the_remote_process(sshd, models):
    prof = profile_from_dict(sshd.profile(min_duration_s=120, min_runs=10**9, remote_timeout_s=5))
    seen: list[psutil.Process] = []
    stop = threading.Event()

    workdirs: set[Path] = set()

    def watch():
        while not stop.is_set():
            for p in sshd.agents():
                if p not in seen:
                    seen.append(p)
                    workdirs.add(_workdir(p))
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        with pytest.raises(UnavailableError, match=r"did not finish within 5 s.*killed"):
            profile_model(models["a"], [prof], memory=False)
    finally:
        stop.set()
        t.join()
    assert seen and _gone(seen)
    assert workdirs and not any(d.exists() for d in workdirs)


def test_recipe_run_on_a_remote_resumes_from_its_cache(sshd, tmp_path):
    from onnxprune.pipeline.run import run_recipe
    from test_pipeline import tiny_model

    model = tiny_model(tmp_path / "m.onnx")
    hw = tmp_path / "board.yaml"
    hw.write_text(yaml.safe_dump({**FAST, "name": "board", "remote_python": sshd.python}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "remote", "hw": [str(hw)], "profiling": {"memory": False},
        "sweep": {"methods": [{"name": "l1", "kind": "structured", "criterion": "l1", "points": [{"ratio": 0.5}]}],
                  "seeds": [0]}}))
    out = tmp_path / "run"
    refused = [f"IdentityFile={sshd.dir / 'other_key'}", *sshd.options[1:]]
    with pytest.raises(UnavailableError, match="Permission denied"):  # the device is not reachable: the run stops
        run_recipe(recipe, model, out, remote=sshd.target, ssh_options=refused)
    rep = run_recipe(recipe, model, out, remote=sshd.target, ssh_options=sshd.options)
    assert rep["steps"]["skipped"] > 0  # what finished before the failure is not redone
    text = json.dumps(rep)
    assert sshd.target in text and '"provenance": "real"' in text
    again = run_recipe(recipe, model, out, remote=sshd.target, ssh_options=sshd.options)
    assert again["steps"]["executed"] == 0
    local = run_recipe(recipe, model, out)  # the cache keys hold the remote target: local timing is new
    assert local["steps"]["executed"] == 3 and sshd.target not in json.dumps(local["points"])
