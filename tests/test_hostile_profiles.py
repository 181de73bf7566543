"""Hostile hardware profiles and paths: a profile is data, and reading one runs nothing.

Every hostile ``remote:``, ssh option and ``remote_python`` below -- from a profile file or from
``--remote``/``--ssh-option`` -- must make the command exit 1 with one error line, before any process
starts (``subprocess``/``os`` process calls are spied) and without creating a file (the values try to
``touch`` a marker). Hostile *model paths* (``./-o...``, ``host:x.onnx``), a ``remote_python`` path
with a space, and models with external data files are copied and profiled over a real OpenSSH
server (the harness of test_remote.py), where sshd is installed.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.model_io import file_sha256
from onnxprune.profiling import remote, ssh_target
from onnxprune.profiling.hw_profile import HwProfile, profile_from_dict, with_remote
from test_remote import FAST, sshd  # noqa: F401 - sshd: the real OpenSSH server fixture

MARK = "MARK"  # replaced by the marker file's path in each test

HOSTILE_REMOTES = [
    "-oProxyCommand=touch${IFS}MARK@h",  # a user that is an ssh option
    "u@-oProxyCommand=touch${IFS}MARK",  # a host that is one
    "-lroot@h",
    "u@h;touch${IFS}MARK",
    "u@h`touch${IFS}MARK`",
    "u@$(touch${IFS}MARK)",
    "u@h\ntouch MARK",
    "u@h touch MARK",
    "u'@h",
    'u"@h',
    "${IFS}@h",
    "u@h:22;touch${IFS}MARK",
    "u@h:22x",
    "u@h:99999",
]
HOSTILE_OPTIONS = [
    "ProxyCommand=touch MARK",
    "proxycommand touch MARK",
    "LocalCommand=touch MARK",
    "PermitLocalCommand=yes",
    "KnownHostsCommand=touch MARK",
    "RemoteCommand=touch MARK",
    'Match=exec "touch MARK"',
    'Match exec "touch MARK"',
    "Include=MARK",
    "PKCS11Provider=MARK.so",
    "ForwardAgent=yes",
    "IdentityFile=k\nProxyCommand touch MARK",
    "ProxyJump=-oProxyCommand=touch${IFS}MARK",
    "ProxyJump=u@h;touch${IFS}MARK",
    "ProxyJump=u@h,u@-oProxyCommand=x",
    "Port=22;touch${IFS}MARK",
    "User=-oProxyCommand=x",
    "HostName=$(touch${IFS}MARK)",
    "StrictHostKeyChecking=`touch MARK`",
    "-oProxyCommand=touch MARK",
]
#: the options refused for running a program here, whose message points to ~/.ssh/config
RUNS_CODE = {"ProxyCommand", "proxycommand", "LocalCommand", "PermitLocalCommand", "KnownHostsCommand", "RemoteCommand",
             "Match", "Include", "PKCS11Provider"}
HOSTILE_PYTHONS = [
    "$(touch MARK)python3",
    "`touch MARK`",
    "python3;touch MARK",
    "python3 -c 'open(\"MARK\", \"w\")'",
    "python3\ntouch MARK",
    "-c",
    "env X=1 python3",
    "/usr/bin/python3 && touch MARK",
    "/usr/bin/python3'",
    'venv/bin/python',  # relative: neither a path from / or ~/ nor a bare name
]
#: (profile field, hostile value) for every case, with a valid remote where the field is not remote
CASES = [("remote", v) for v in HOSTILE_REMOTES] + [("ssh_options", v) for v in HOSTILE_OPTIONS] + \
        [("remote_python", v) for v in HOSTILE_PYTHONS]
IDS = [f"{field}:{value!r}" for field, value in CASES]


def conv_model(path: Path, channels: int = 4, seed: int = 0, location: str | None = None) -> Path:
    """A Conv+Relu model; with ``location``, its weights in that external data file."""
    w = np.random.default_rng(seed).standard_normal((channels, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    if location:
        (path.parent / location).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                        size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.fixture
def no_process(monkeypatch):
    """Every way to start a process, spied: a call is recorded and refused."""
    calls: list[str] = []

    def spy(name):
        def refuse(*args, **kwargs):
            calls.append(f"{name}{args[:1]}")
            raise AssertionError(f"{name} was called: {args[:1]}")
        return refuse

    monkeypatch.setattr(subprocess, "Popen", spy("subprocess.Popen"))
    for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp",
                 "execvpe", "spawnv", "spawnve", "spawnvp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, spy(f"os.{name}"))
    return calls


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory with a model; the marker any hostile value would create is tmp/MARK."""
    monkeypatch.chdir(tmp_path)
    model = conv_model(tmp_path / "m.onnx")
    marker = tmp_path / MARK
    return tmp_path, model, marker


def _files(d: Path) -> set[Path]:
    return set(d.rglob("*"))


def _profile_for(field: str, value: str, marker: Path) -> dict:
    value = value.replace(MARK, str(marker))
    base = {**FAST, "name": "hostile", "remote": "pi@board.local"}
    if field == "ssh_options":
        return {**base, "ssh_options": [value]}
    return {**base, field: value}


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("field,value", CASES, ids=IDS)
def test_hostile_profile_file_exits_1_in_one_line_running_nothing(field, value, place, no_process):
    d, model, marker = place
    hw = d / "hostile.yaml"
    hw.write_text(yaml.safe_dump(_profile_for(field, value, marker)))
    before = _files(d)
    for args in (("profile", model, "--hw", hw, "--no-memory"), ("compare", model, model, "--hw", hw),
                 ("run", "demo", model, "-o", d / "out", "--hw", hw)):
        code, out, err = run_cli(*args)
        line = _one_error_line(err)
        assert code == 1 and str(hw) in line and field in line, (args[0], line)
        if field == "ssh_options" and value.split("=")[0].split()[0] in RUNS_CODE:
            assert "~/.ssh/config" in line
    assert no_process == [] and not marker.exists() and _files(d) == before


@pytest.mark.parametrize("value", HOSTILE_REMOTES, ids=repr)
def test_hostile_remote_flag_exits_1_in_one_line_running_nothing(value, place, no_process):
    d, model, marker = place
    before = _files(d)
    code, _, err = run_cli("profile", model, "--remote", value.replace(MARK, str(marker)), "--no-memory")
    line = _one_error_line(err)
    assert code == 1 and "--remote" in line and "USER@HOST[:PORT]" in line
    assert no_process == [] and not marker.exists() and _files(d) == before


@pytest.mark.parametrize("value", HOSTILE_OPTIONS, ids=repr)
def test_hostile_ssh_option_flag_exits_1_in_one_line_running_nothing(value, place, no_process):
    d, model, marker = place
    before = _files(d)
    for args in (("profile", model, "--remote", "pi@board.local", "--no-memory"),
                 ("run", "demo", model, "-o", d / "out", "--remote", "pi@board.local")):
        code, _, err = run_cli(*args, "--ssh-option", value.replace(MARK, str(marker)))
        line = _one_error_line(err)
        assert code == 1 and "--ssh-option" in line
    assert no_process == [] and not marker.exists() and _files(d) == before


def test_command_options_point_to_ssh_config_in_one_line():
    for key in ("ProxyCommand", "LocalCommand", "KnownHostsCommand", "RemoteCommand", "PermitLocalCommand", "Match"):
        with pytest.raises(OnnxPruneError) as exc:
            profile_from_dict({**FAST, "remote": "pi@h", "ssh_options": [f"{key}=exec true"]}, "p.yaml")
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith("p.yaml: field 'ssh_options'") and "put it in ~/.ssh/config" in msg


def test_python_api_refuses_the_same_values():
    prof = profile_from_dict({**FAST, "name": "p"})
    for remote_value in HOSTILE_REMOTES:
        with pytest.raises(OnnxPruneError, match="USER@HOST"):
            with_remote(prof, remote_value)
    for option in HOSTILE_OPTIONS:
        with pytest.raises(OnnxPruneError, match="ssh_options"):
            with_remote(prof, "pi@h", [option])
    for python in HOSTILE_PYTHONS:
        with pytest.raises(ValueError, match="bare command name"):
            HwProfile.model_validate({**FAST, "remote_python": python})
        with pytest.raises(ValueError):
            ssh_target.remote_command(python, "-c", "pass")


def test_allowed_options_pass_canonically_spelled():
    prof = with_remote(profile_from_dict({**FAST, "name": "p"}), "pi@[::1]:2222",
                       ["identityfile=~/.ssh/board", "ProxyJump=me@gate:22,ssh://jump", "StrictHostKeyChecking=accept-new",
                        "ConnectTimeout = 3", "Port=2200", "HostKeyAlias=board"])
    assert prof.ssh_options == ["IdentityFile=~/.ssh/board", "ProxyJump=me@gate:22,ssh://jump",
                                "StrictHostKeyChecking=accept-new", "ConnectTimeout=3", "Port=2200", "HostKeyAlias=board"]
    for ok in ("python3", "python3.11", "/opt/my venv/bin/python", "~/venv/bin/python"):
        assert HwProfile.model_validate({**FAST, "remote_python": ok}).remote_python == ok


# --------------------------------------------------------------------------- what reaches a shell

def test_every_remote_word_is_one_word_in_the_device_shell(tmp_path):
    """``remote_command`` through a real ``sh -c`` (what sshd runs): hostile arguments stay literal, and a
    ``~/`` python path with a space is found under ``$HOME``."""
    home = tmp_path / "home"
    script = home / "my venv" / "bin" / "python"
    script.parent.mkdir(parents=True)
    script.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    script.chmod(0o755)
    marker = tmp_path / MARK
    args = [f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}", "a b", "'", '"', "-o x", "\n"]
    cmd = ssh_target.remote_command("~/my venv/bin/python", *args)
    out = subprocess.run(["sh", "-c", cmd], env={"HOME": str(home), "PATH": os.environ["PATH"]}, capture_output=True,
                         text=True, check=True).stdout
    assert out == "".join(f"{a}\n" for a in args) and not marker.exists()


def test_ssh_and_scp_argv_end_with_double_dash_then_destination():
    target = ssh_target.parse_target("pi@board:2222")
    argv = ssh_target.ssh_argv(target, ["Port=22"], "true")
    assert argv[-3:] == ["--", "pi@board", "true"]
    for name in ("-oProxyCommand=touch x.onnx", "host:x.onnx"):
        scp = ssh_target.scp_argv(target, [], name, "/tmp/d/x.onnx")
        src = scp[-2]
        assert scp[-3] == "--" and src == str(Path(name).resolve()) and src.startswith("/")


def test_external_data_named_outside_the_model_folder_is_refused(tmp_path):
    model = conv_model(tmp_path / "m" / "m.onnx", location="w.bin")
    proto = onnx.load(str(model), load_external_data=False)
    (model.parent / "w.bin").rename(tmp_path / "w.bin")
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../w.bin"
    onnx.save_model(proto, str(model))
    with pytest.raises(OnnxPruneError, match="cannot be copied to the device"):
        remote.ModelFiles.of(model)


def test_model_files_keep_the_external_data_names(tmp_path):
    a = remote.ModelFiles.of(conv_model(tmp_path / "a" / "m.onnx", seed=0, location="data/weights.bin"))
    b = remote.ModelFiles.of(conv_model(tmp_path / "b" / "m.onnx", seed=1, location="data/weights.bin"))
    assert [n for _, n, _ in a.files][1:] == ["data/weights.bin"] and a.files[0][1].endswith(".onnx")
    assert a.key != b.key  # same names, different bytes: separate directories on the device


# ------------------------------------------------------------------------------------- over real SSH

def test_hostile_model_paths_are_copied_as_files(sshd, tmp_path, monkeypatch):
    """``./-o...`` and ``host:x.onnx`` are local files (scp gets absolute sources), copied and measured."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARK.onnx"  # what scp would create, were the name read as an option
    a = conv_model(tmp_path / "-oProxyCommand=touch MARK.onnx", channels=8)
    b = conv_model(tmp_path / "host:x.onnx", channels=4)
    hw = tmp_path / "board.yaml"
    hw.write_text(yaml.safe_dump({**FAST, "name": "board", "remote_python": sshd.python}))
    opts = [x for o in sshd.options for x in ("--ssh-option", o)]
    code, out, err = run_cli("compare", f"./{a.name}", b.name, "--hw", hw, "--remote", sshd.target, *opts, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["remote"]["model_copied"] == {a.name: True, b.name: True}
    assert res["ratios"]["macs_reduction"] == pytest.approx(2.0) and res["provenance"] == "real"
    assert not marker.exists() and " " in sshd.python  # remote_python is a path with a space in it


def test_external_data_models_are_copied_with_every_file(sshd, tmp_path):
    """Two models whose data files share a name: each is profiled on the device with its own data."""
    # >= 256 weights each: the local checker skips big weights' data (it would look for small ones from the cwd)
    a = conv_model(tmp_path / "a" / "wide.onnx", channels=16, location="data/weights.bin")
    b = conv_model(tmp_path / "b" / "narrow.onnx", channels=12, location="data/weights.bin")
    prof = profile_from_dict(sshd.profile())
    session = remote.session_for(prof)
    try:
        with remote.sessions():
            placed = session.upload([a, b])
            for local in (a, b):
                dest = Path(placed[local][0])
                assert file_sha256(dest) == file_sha256(local)
                assert file_sha256(dest.parent / "data" / "weights.bin") == file_sha256(local.parent / "data" / "weights.bin")
            from onnxprune.profiling import compare_models

            res = compare_models(a, b, prof, memory=False)
    finally:
        remote.close_all()
    assert res["remote"]["model_copied"] == {str(a): False, str(b): False}  # already there, by hash
    assert res["a"]["params"] == 16 * 27 and res["b"]["params"] == 12 * 27


def test_a_model_named_like_an_option_is_profiled_locally_with_memory(tmp_path, monkeypatch):
    """The memory probe child gets the model after ``--``, as an absolute path."""
    monkeypatch.chdir(tmp_path)
    conv_model(tmp_path / "-oX.onnx")
    hw = tmp_path / "fast.yaml"
    hw.write_text(yaml.safe_dump(FAST))
    code, out, err = run_cli("profile", "./-oX.onnx", "--hw", hw, "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["peak_rss_bytes"] > 0
