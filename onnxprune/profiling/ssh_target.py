"""Where a remote profile is measured, as data: the SSH destination, its options, the device's Python.

Hardware profiles are shared files (a team's board, a CI config), so nothing in them may run
anything on the machine that reads them. Everything a profile or ``--remote``/``--ssh-option``
says about the device is validated here, when the profile is loaded, and turned into argv lists:

- ``remote`` is ``[USER@]HOST[:PORT]`` from a small alphabet (no leading ``-``, no whitespace, no
  shell characters), and ``--`` precedes it on every ssh/scp command line;
- ssh options come from an allowlist, each value checked; options that make ssh run a program
  (``ProxyCommand``, ``LocalCommand``, ``KnownHostsCommand``, ``Match exec``...) are refused: they
  belong in ``~/.ssh/config``, which the user controls and ssh reads anyway;
- ``remote_python`` is a path or a bare command name, and reaches the device's shell only quoted;
- scp copies from absolute resolved local paths, so no file name reads as an option or a host.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

#: ssh options set unless the user sets them (ssh keeps the first value given); BatchMode is forced
DEFAULT_SSH_OPTIONS = ("ConnectTimeout=15", "ServerAliveInterval=5", "ServerAliveCountMax=3")

_USER = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_HOSTNAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_IPV6 = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]+)?"
_TARGET = re.compile(rf"(?:(?P<user>{_USER})@)?(?P<host>\[{_IPV6}\]|{_HOSTNAME})(?::(?P<port>\d{{1,5}}))?")
_FORM = "USER@HOST[:PORT]"


@dataclass(frozen=True)
class Target:
    """``USER@HOST[:PORT]`` split; ``host`` without IPv6 brackets."""

    user: str | None
    host: str
    port: int | None

    def __str__(self) -> str:
        return (f"{self.user}@" if self.user else "") + self._bracketed + (f":{self.port}" if self.port else "")

    @property
    def _bracketed(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def destination(self) -> str:
        """What ssh takes (the port goes to ``-p``)."""
        return (f"{self.user}@" if self.user else "") + self.host

    def scp_path(self, path: str) -> str:
        return (f"{self.user}@" if self.user else "") + f"{self._bracketed}:{path}"


def parse_target(text: str) -> Target:
    """``USER@HOST[:PORT]`` (user and port optional, IPv6 in brackets, or a ``~/.ssh/config`` alias);
    ValueError says the form and what is wrong."""
    m = _TARGET.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not {_FORM} (e.g. pi@raspberrypi.local:22){_why_not_target(text)}")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{text!r} is not {_FORM}: port {port} is not 1-65535")
    return Target(m["user"], m["host"].strip("[]"), port)


def _why_not_target(text: object) -> str:
    if not isinstance(text, str) or not text:
        return ""
    if any(c.isspace() or not c.isprintable() for c in text):
        return ": it contains whitespace or a control character"
    if text.startswith("-") or "@-" in text:
        return ": a user or host starting with '-' would be read by ssh as an option"
    bad = sorted(set(re.sub(r"[A-Za-z0-9_.@:\[\]-]", "", text)))
    return f": {''.join(bad)!r} is not allowed in a user or host name" if bad else ""


# ------------------------------------------------------------------------------------ ssh options
# One check per allowed option: the value is refused (a message) or accepted (None). Options that
# run programs, load code, forward ports or the agent, or keep processes around are not in the table.

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_of(*values: str) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        return None if v.lower() in values else f"one of {', '.join(values)}"
    return check


def _pattern(rx: str, what: str) -> Callable[[str], str | None]:
    compiled = re.compile(rx)
    return lambda v: None if compiled.fullmatch(v) else what


def _text(v: str) -> str | None:
    """Paths and lists of paths: ssh expands ``~``, ``%`` tokens and ``${VAR}``; none of it runs anything."""
    return None if v and not _CONTROL.search(v) else "text without control characters (newlines, tabs)"


def _port(v: str) -> str | None:
    return None if v.isdigit() and 0 < int(v) < 65536 else "a port number 1-65535"


def _jumps(v: str) -> str | None:
    """``none`` or comma-separated jump hosts, each validated like ``remote``."""
    if v.lower() == "none":
        return None
    for hop in v.split(","):
        try:
            parse_target(hop.removeprefix("ssh://"))
        except ValueError as exc:
            return f"jump hosts {_FORM} separated by commas ({exc})"
    return None


_YES_NO = _one_of("yes", "no")
_COUNT = _pattern(r"\d{1,6}", "a whole number")
_ALGORITHMS = _pattern(r"[+^-]?[A-Za-z0-9@._+-]+(?:,[A-Za-z0-9@._+-]+)*", "a comma-separated list of algorithm names")
_HOST = _pattern(rf"{_HOSTNAME}|{_IPV6}", "a host name or address")

SSH_OPTIONS: dict[str, Callable[[str], str | None]] = {
    "AddressFamily": _one_of("any", "inet", "inet6"),
    "BatchMode": _YES_NO,  # forced to yes in any case
    "BindAddress": _HOST,
    "CertificateFile": _text,
    "CheckHostIP": _YES_NO,
    "Ciphers": _ALGORITHMS,
    "Compression": _YES_NO,
    "ConnectionAttempts": _COUNT,
    "ConnectTimeout": _COUNT,
    "GlobalKnownHostsFile": _text,
    "HashKnownHosts": _YES_NO,
    "HostKeyAlgorithms": _ALGORITHMS,
    "HostKeyAlias": _pattern(_HOSTNAME, "a host name (letters, digits, '_', '.', '-')"),
    "HostName": _HOST,
    "IdentitiesOnly": _YES_NO,
    "IdentityAgent": _text,
    "IdentityFile": _text,
    "IPQoS": _pattern(r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)?", "one or two QoS names"),
    "KbdInteractiveAuthentication": _YES_NO,
    "KexAlgorithms": _ALGORITHMS,
    "LogLevel": _one_of("quiet", "fatal", "error", "info", "verbose", "debug", "debug1", "debug2", "debug3"),
    "MACs": _ALGORITHMS,
    "NumberOfPasswordPrompts": _COUNT,
    "PasswordAuthentication": _YES_NO,
    "Port": _port,
    "PreferredAuthentications": _ALGORITHMS,
    "ProxyJump": _jumps,
    "PubkeyAcceptedAlgorithms": _ALGORITHMS,
    "PubkeyAcceptedKeyTypes": _ALGORITHMS,
    "PubkeyAuthentication": _one_of("yes", "no", "unbound", "host-bound"),
    "RekeyLimit": _pattern(r"[0-9]+[KMGkmg]?(?: [0-9]+[smhdwSMHDW]?| none)?|default(?: [0-9]+[smhdwSMHDW]?| none)?",
                           "a size and optional time (e.g. 1G 1h)"),
    "ServerAliveCountMax": _COUNT,
    "ServerAliveInterval": _COUNT,
    "StrictHostKeyChecking": _one_of("yes", "no", "accept-new", "off", "ask"),
    "TCPKeepAlive": _YES_NO,
    "UpdateHostKeys": _one_of("yes", "no", "ask"),
    "User": _pattern(_USER, "a user name (letters, digits, '_', '.', '-'; not starting with '-')"),
    "UserKnownHostsFile": _text,
    "VerifyHostKeyDNS": _one_of("yes", "no", "ask"),
}
_CANONICAL = {k.lower(): k for k in SSH_OPTIONS}
#: options that make ssh run or load a program on this machine (besides every ``*Command``)
_RUNS_CODE = {"match", "include", "host", "pkcs11provider", "securitykeyprovider", "xauthlocation", "proxyusefdpass"}
_KEY = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?: *= *| +)(.*)")
_IN_SSH_CONFIG = ("put it in ~/.ssh/config (which you control, and ssh reads) under a Host entry for the device")


def check_ssh_option(text: str) -> str:
    """An ssh option from a profile or ``--ssh-option``, as ``Key=value`` with the key's canonical
    spelling; ValueError (one line) for a refused option or value."""
    if isinstance(text, str) and _CONTROL.search(text):
        raise ValueError(f"ssh option {text!r} contains a control character (a newline, a tab...)")
    m = _KEY.fullmatch(text) if isinstance(text, str) else None
    if m is None or not m[2]:
        raise ValueError(f"ssh option {text!r} is not KEY=VALUE (e.g. IdentityFile=~/.ssh/board)")
    key, value = m[1], m[2]
    if key.lower().endswith("command") or key.lower() in _RUNS_CODE:
        raise ValueError(f"ssh option {key} can run a program on this machine, so a profile or --ssh-option may not "
                         f"set it; {_IN_SSH_CONFIG}")
    name = _CANONICAL.get(key.lower())
    if name is None:
        raise ValueError(f"ssh option {key} is not one a profile or --ssh-option may set (allowed: "
                         f"{', '.join(SSH_OPTIONS)}); {_IN_SSH_CONFIG}")
    problem = SSH_OPTIONS[name](value)
    if problem:
        raise ValueError(f"ssh option {name}={value!r}: expected {problem}")
    return f"{name}={value}"


# ------------------------------------------------------------------------------- the device's Python

_COMMAND_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_PATH = re.compile(r"(?:/|~/)[\w ./+@,:=%~-]*[\w .+@,:=%~-]")


def check_remote_python(text: str) -> str:
    """``remote_python`` is a bare command name (``python3``) or a path (``/opt/venv/bin/python``,
    ``~/venv/bin/python``; spaces allowed): one word on the device, never a shell fragment."""
    if isinstance(text, str) and (_COMMAND_NAME.fullmatch(text) or _PATH.fullmatch(text)):
        return text
    raise ValueError(f"{text!r} is not a bare command name (python3) or a path (/..., ~/...; letters, digits, spaces "
                     "and _ . + - @ , : = % ~); it reaches the device as one quoted word, so for arguments or "
                     "environment variables point it to a wrapper script")


def remote_command(python: str, *args: str) -> str:
    """``python args...`` for the device's shell, every word quoted (``~/`` becomes ``"$HOME"/``)."""
    check_remote_python(python)
    head = '"$HOME"/' + shlex.quote(python[2:]) if python.startswith("~/") else shlex.quote(python)
    return " ".join([head, *(shlex.quote(a) for a in args)])


# ------------------------------------------------------------------------------------------- argv

def ssh_options(options: Sequence[str]) -> list[str]:
    """``-o`` arguments: BatchMode first (cannot be overridden), then the user's, then the defaults."""
    options = [check_ssh_option(o) for o in options]
    given = {o.split("=", 1)[0].lower() for o in options}
    opts = ["BatchMode=yes", *options, *(d for d in DEFAULT_SSH_OPTIONS if d.split("=", 1)[0].lower() not in given)]
    return [arg for o in opts for arg in ("-o", o)]


def ssh_argv(target: Target, options: Sequence[str], command: str) -> list[str]:
    """``ssh ... -- DEST COMMAND``; ``command`` is for the device's shell, so its words must be quoted."""
    port = ["-p", str(target.port)] if target.port else []
    return ["ssh", *ssh_options(options), *port, "--", target.destination, command]


def scp_argv(target: Target, options: Sequence[str], src: str | os.PathLike, dest: str) -> list[str]:
    """``scp ... -- /ABS/SRC DEST:PATH``: an absolute source is never an option (``-o...``) or a host (``a:b``)."""
    port = ["-P", str(target.port)] if target.port else []
    return ["scp", "-q", *ssh_options(options), *port, "--", str(Path(src).resolve()), target.scp_path(dest)]
