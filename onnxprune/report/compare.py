"""``onnxprune compare-runs DIR1 DIR2``: two runs' points side by side (matched by point id)."""
from __future__ import annotations

import os
from typing import Any, Mapping

from .plots import accuracy_split, all_points
from .schema import load_report


def _figures(p: Mapping[str, Any], split: str | None, profiles: list[str]) -> dict[str, Any]:
    acc = (p.get("accuracy", {}).get(split) or {}).get("top1") if split else None
    out = {"method": p["method"], "params": p["params"], "nonzero_params": p["nonzero_params"],
           "compression_ratio": p["compression_ratio"], "macs": p["macs"], "gzip_bytes": p["gzip_bytes"],
           "top1": acc["mean"] if acc else None, "top1_std": acc["std"] if acc else None, "latency_p50_ms": {}}
    for prof in profiles:
        recs = p.get("profiles", {}).get(prof) or []
        out["latency_p50_ms"][prof] = recs[0]["latency_ms"]["p50"] if recs else None
    return out


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _machines(report: Mapping[str, Any]) -> dict[str, str]:
    """Fingerprint -> host of the machines a run's latencies were measured on (its measured_on records)."""
    out: dict[str, str] = {}
    for p in all_points(report):
        for recs in (p.get("profiles") or {}).values():
            for r in recs:
                on = r.get("measured_on") or {}
                for fp in on.get("fingerprints") or [on.get("fingerprint")]:
                    if fp:
                        out.setdefault(fp, on.get("host") or "?")
    return out


def compare_runs(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> dict[str, Any]:
    """Matched points (id) with their accuracy, size and latency in both runs and the differences B - A."""
    a, b = load_report(dir_a), load_report(dir_b)
    sa, sb = accuracy_split(a), accuracy_split(b)
    split = sa if sa == sb else None
    profiles = [p["name"] for p in a["hw_profiles"] if p["name"] in {q["name"] for q in b["hw_profiles"]}]
    pa = {p["id"]: p for p in all_points(a)}
    pb = {p["id"]: p for p in all_points(b)}
    rows = []
    for pid in [*pa, *[k for k in pb if k not in pa]]:
        fa = _figures(pa[pid], split, profiles) if pid in pa else None
        fb = _figures(pb[pid], split, profiles) if pid in pb else None
        row: dict[str, Any] = {"id": pid, "a": fa, "b": fb}
        if fa and fb:
            row["delta"] = {"top1": _delta(fa["top1"], fb["top1"]),
                            "latency_p50_ms": {k: _delta(fa["latency_p50_ms"][k], fb["latency_p50_ms"][k]) for k in profiles}}
        rows.append(row)
    notes = []
    if sa != sb:
        notes.append(f"the runs measured accuracy on different splits ({sa} vs {sb}); accuracy is not compared")
    ra, rb = a.get("retraining"), b.get("retraining")
    same_retrain = (ra or {}).get("config") == (rb or {}).get("config")
    if not same_retrain:
        notes.append("the runs used different retraining configs: accuracy differences may come from that")
    ma, mb = _machines(a), _machines(b)
    if ma and mb and set(ma) != set(mb):
        def names(m: dict[str, str]) -> str:
            return ", ".join(f"{host} ({fp})" for fp, host in sorted(m.items()))
        notes.append(f"the runs measured latency on different machines ({names(ma)} vs {names(mb)}): "
                     "latency differences may come from that")
    if (a.get("model") or {}).get("sha256") != (b.get("model") or {}).get("sha256"):
        notes.append("the runs started from different input models")
    return {"a": str(dir_a), "b": str(dir_b), "recipe_a": a["recipe"].get("name"), "recipe_b": b["recipe"].get("name"),
            "split": split, "profiles": profiles, "same_retraining": same_retrain, "rows": rows, "notes": notes}
