"""Recurrent ONNX ops (LSTM, GRU, RNN) in torch, as hand-written cell loops over time.

Why not ``nn.LSTM``/``nn.GRU``: their gate order (LSTM i,f,g,o; GRU r,z,n) and layout differ from
ONNX's, and torch's GRU is ONNX's ``linear_before_reset=1`` only, while ONNX's default is 0. A loop
over the graph's own W/R/B tensors computes exactly the ONNX equations, keeps W/R/B as the module's
parameters (so :func:`onnxprune.bridge.write_back` returns them to the same initializers) and covers
what the modules cannot: ``sequence_lens``, peepholes, ``clip``, ``input_forget``, per-direction
activations. The input projection of all steps is one matmul; only the recurrence loops.

ONNX layout (per direction d): ``W[d]`` is ``[G*H, I]``, ``R[d]`` is ``[G*H, H]``, ``B[d]`` is
``[Wb (G*H), Rb (G*H)]``; gate blocks in order LSTM i,o,f,c; GRU z,r,h; RNN one block. ``layout=0``:
X ``[T, N, I]``, Y ``[T, D, N, H]``, states ``[D, N, H]``; ``layout=1``: X ``[N, T, I]``, Y
``[N, T, D, H]``, states ``[N, D, H]``. With ``sequence_lens``, a batch entry stops at its length:
Y is zero beyond it, Y_h/Y_c hold the state at its last valid step, and the reverse direction starts
at step ``len - 1`` (what ONNX Runtime does). ``clip`` bounds every gate's input to its activation.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .ops import Node, op

#: activation functions the recurrent ops accept, with their ONNX op defaults (lower-case names:
#: ONNX Runtime compares them case-insensitively). Affine and ScaledTanh have no op defaults.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "softsign": F.softsign, "softplus": F.softplus,
    "leakyrelu": lambda x: F.leaky_relu(x, 0.01), "elu": F.elu,
    "thresholdedrelu": lambda x: torch.where(x > 1.0, x, torch.zeros_like(x)),
    "hardsigmoid": lambda x: torch.clamp(0.2 * x + 0.5, 0.0, 1.0),
}
#: op type -> (gate blocks G, default activations of one direction, outputs)
SPECS: dict[str, tuple[int, tuple[str, ...], int]] = {
    "LSTM": (4, ("Sigmoid", "Tanh", "Tanh"), 3), "GRU": (3, ("Sigmoid", "Tanh"), 2), "RNN": (1, ("Tanh",), 2),
}
DIRECTIONS = ("forward", "reverse", "bidirectional")


def _num_directions(n: Node) -> int:
    return 2 if n.attr("direction", "forward") == "bidirectional" else 1


def activations(n: Node) -> list[list[Callable[[torch.Tensor], torch.Tensor]]]:
    """The activation functions of each direction (``activations`` attribute or the op's defaults)."""
    _, defaults, _ = SPECS[n.op_type]
    names = list(n.attr("activations") or defaults * _num_directions(n))
    k = len(defaults)
    return [[ACTIVATIONS[a.lower()] for a in names[d * k:(d + 1) * k]] for d in range(_num_directions(n))]


def check_recurrent(n: Node) -> None:
    """Refuse, when the module is built, what the loops below do not compute."""
    _, defaults, n_out = SPECS[n.op_type]
    direction = n.attr("direction", "forward")
    if direction not in DIRECTIONS:
        raise n.fail(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    if n.attr("layout", 0) not in (0, 1):
        raise n.fail(f"layout {n.attr('layout')} is not 0 or 1")
    if n.attr("activation_alpha") is not None or n.attr("activation_beta") is not None:
        raise n.fail("with activation_alpha/activation_beta is not supported by the bridge "
                     "(only activations at their ONNX op defaults)")
    names = n.attr("activations")
    if names is not None:
        want = len(defaults) * _num_directions(n)
        if len(names) != want:
            raise n.fail(f"has {len(names)} activations; direction {direction!r} needs {want}")
        unknown = [a for a in names if a.lower() not in ACTIVATIONS]
        if unknown:
            raise n.fail(f"activation {unknown[0]!r} is not supported by the bridge "
                         f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    if n.op_type == "LSTM" and n.attr("input_forget", 0) not in (0, 1):
        raise n.fail(f"input_forget {n.attr('input_forget')} is not 0 or 1")
    extra = [o for o in n.outputs[n_out:] if o]
    if extra:
        raise n.fail(f"has {len(n.outputs)} outputs; {n.op_type} has {n_out}")


def _lstm_cell(n: Node, acts, xp, h, c, r, rb, p):
    f, g, act_h = acts
    clip = n.attr("clip")
    gates = xp + h @ r.T + (rb if rb is not None else 0)
    gi, go, gf, gc = gates.chunk(4, dim=-1)
    pi, po, pf = p.chunk(3) if p is not None else (None, None, None)
    cut = (lambda v: v.clamp(-clip, clip)) if clip is not None else (lambda v: v)
    i = f(cut(gi + pi * c if pi is not None else gi))
    if n.attr("input_forget", 0):
        fg = 1 - i
    else:
        fg = f(cut(gf + pf * c if pf is not None else gf))
    c_new = fg * c + i * g(cut(gc))
    o = f(cut(go + po * c_new if po is not None else go))
    return o * act_h(c_new), c_new


def _gru_cell(n: Node, acts, xp, h, c, r, rb, p):
    f, g = acts
    clip = n.attr("clip")
    cut = (lambda v: v.clamp(-clip, clip)) if clip is not None else (lambda v: v)
    hs = r.shape[-1]
    r_zr, r_h = r[:2 * hs], r[2 * hs:]
    rb_zr, rb_h = (rb[:2 * hs], rb[2 * hs:]) if rb is not None else (0, 0)
    x_zr, x_h = xp[..., :2 * hs], xp[..., 2 * hs:]
    z, rg = (f(cut(v)) for v in (x_zr + h @ r_zr.T + rb_zr).chunk(2, dim=-1))
    if n.attr("linear_before_reset", 0):
        cand = g(cut(x_h + rg * (h @ r_h.T + rb_h)))
    else:
        cand = g(cut(x_h + (rg * h) @ r_h.T + rb_h))
    return (1 - z) * cand + z * h, c


def _rnn_cell(n: Node, acts, xp, h, c, r, rb, p):
    clip = n.attr("clip")
    pre = xp + h @ r.T + (rb if rb is not None else 0)
    return acts[0](pre.clamp(-clip, clip) if clip is not None else pre), c


_CELLS = {"LSTM": _lstm_cell, "GRU": _gru_cell, "RNN": _rnn_cell}


@op("LSTM", "GRU", "RNN", check=check_recurrent)
def recurrent(n: Node, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    """LSTM / GRU / RNN with ONNX semantics (see the module docstring); returns (Y, Y_h[, Y_c])."""
    gates, _, n_out = SPECS[n.op_type]
    cell = _CELLS[n.op_type]
    layout = n.attr("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
        initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
    steps, batch = x.shape[0], x.shape[1]
    num_dir, hidden = w.shape[0], r.shape[-1]
    lens = sequence_lens.to(device=x.device, dtype=torch.long).reshape(-1, 1) if sequence_lens is not None else None
    acts = activations(n)
    ys, hs, cs = [], [], []
    for d in range(num_dir):
        reverse = n.attr("direction", "forward") == "reverse" or d == 1
        wb, rb = (b[d, :gates * hidden], b[d, gates * hidden:]) if b is not None else (None, None)
        xp = x @ w[d].T
        if wb is not None:
            xp = xp + wb
        h = initial_h[d] if initial_h is not None else x.new_zeros((batch, hidden))
        c = initial_c[d] if initial_c is not None else x.new_zeros((batch, hidden))
        out: list[torch.Tensor | None] = [None] * steps
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            h_new, c_new = cell(n, acts[d], xp[t], h, c, r[d], rb, p[d] if p is not None else None)
            if lens is None:
                out[t] = h_new
            else:  # entries past their length keep their state and output zeros
                valid = t < lens
                h_new, c_new = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
                out[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
            h, c = h_new, c_new
        ys.append(torch.stack(out) if steps else x.new_zeros((0, batch, hidden)))
        hs.append(h)
        cs.append(c)
    y, y_h, y_c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
    if layout:
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    return (y, y_h, y_c)[:n_out]
