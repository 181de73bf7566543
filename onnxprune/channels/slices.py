"""Reading and writing the elements of one group channel in a member's array.

For an ordinary member, group channel ``k`` is ``array`` at ``member.positions[k]`` along
``member.axis``. For a grouped conv weight (``member.groups > 1``) positions index the op's full
channel range and each one lives in the rows of its block only; these helpers hide the difference.
"""
from __future__ import annotations

import numpy as np

from .types import Member


def channel_index(member: Member, shape: tuple[int, ...], k: int) -> list[tuple]:
    """Index tuples (for ``array[idx]``) covering group channel ``k`` of ``member`` in an array of ``shape``."""
    pos = list(member.positions[k])
    if not pos:
        return []
    if member.groups <= 1:
        idx = [slice(None)] * len(shape)
        idx[member.axis] = pos
        return [tuple(idx)]
    width = shape[member.axis]
    rows = shape[0] // member.groups
    out = []
    for p in pos:
        j = p // width
        idx = [slice(None)] * len(shape)
        idx[0] = slice(j * rows, (j + 1) * rows)
        idx[member.axis] = p - j * width
        out.append(tuple(idx))
    return out


def channel_values(array: np.ndarray, member: Member, k: int) -> np.ndarray:
    """All elements of group channel ``k`` of ``member``, flattened."""
    parts = [np.asarray(array[i]).reshape(-1) for i in channel_index(member, array.shape, k)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=array.dtype)


def zero_channels(array: np.ndarray, member: Member, channels) -> np.ndarray:
    """A copy of ``array`` with group channels ``channels`` of ``member`` set to zero."""
    out = np.array(array, copy=True)
    for k in channels:
        for idx in channel_index(member, out.shape, int(k)):
            out[idx] = 0
    return out
