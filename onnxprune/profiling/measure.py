"""Timing loops: warm-up, then at least ``min_runs`` runs AND at least ``min_duration_s`` seconds.

Comparisons interleave their models (A B A B ...) in one loop, so drift on a noisy machine (thermal
throttling, another process waking up) hits every model alike instead of whichever ran second.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ..core.errors import OnnxPruneError


@dataclass
class Timing:
    """Per-run latencies (seconds) of one runner and the wall time of the measured phase."""

    seconds: list[float]
    duration_s: float
    warmup_runs: int

    @property
    def runs(self) -> int:
        return len(self.seconds)


def measure(run: Callable[[], object], *, warmup_runs: int, min_runs: int, min_duration_s: float,
            clock: Callable[[], float] = time.perf_counter, max_runs: int | None = None) -> Timing:
    """Time ``run()``: ``warmup_runs`` untimed calls, then calls until both minimums are met."""
    return measure_interleaved([run], warmup_runs=warmup_runs, min_runs=min_runs, min_duration_s=min_duration_s,
                               clock=clock, max_runs=max_runs)[0]


def measure_interleaved(runs: Sequence[Callable[[], object]], *, warmup_runs: int, min_runs: int, min_duration_s: float,
                        clock: Callable[[], float] = time.perf_counter, max_runs: int | None = None) -> list[Timing]:
    """Time several runners in rounds (A B A B ...): each round calls every runner once, in order.

    Rounds continue until there are at least ``min_runs`` rounds and the measured phase has lasted
    at least ``min_duration_s`` (or ``max_runs`` rounds, a safety cap for huge duration settings).
    Warm-up rounds are interleaved the same way and not timed.
    """
    if min_runs < 1:
        raise ValueError("min_runs must be >= 1")
    for _ in range(warmup_runs):
        for run in runs:
            run()
    samples: list[list[float]] = [[] for _ in runs]
    start = clock()
    rounds = 0
    while True:
        for run, out in zip(runs, samples):
            t0 = clock()
            run()
            out.append(clock() - t0)
        rounds += 1
        if rounds >= min_runs and clock() - start >= min_duration_s:
            break
        if max_runs is not None and rounds >= max_runs:
            break
    duration = clock() - start
    return [Timing(seconds=s, duration_s=duration, warmup_runs=warmup_runs) for s in samples]


def usable_cores() -> list[int]:
    """Core ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def cpu_affinity(cores: Sequence[int] | None, where: str = "profile") -> Iterator[list[str]]:
    """Pin this process (and threads it creates inside the block) to ``cores``; restore afterwards.

    Yields notes (e.g. when the OS has no affinity call). Cores this process cannot use are an error
    naming them, not silently dropped.
    """
    notes: list[str] = []
    if not cores:
        yield notes
        return
    if not hasattr(os, "sched_setaffinity"):
        notes.append(f"cpu_affinity {list(cores)} ignored: this OS has no sched_setaffinity")
        yield notes
        return
    allowed = usable_cores()
    missing = sorted(set(cores) - set(allowed))
    if missing:
        raise OnnxPruneError(f"{where}: cpu_affinity asks for core(s) {missing}, but this machine lets onnxprune use only "
                             f"{len(allowed)} core(s): {allowed}")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield notes
    finally:
        os.sched_setaffinity(0, before)
