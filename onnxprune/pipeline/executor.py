"""Where a sweep's operating points run: in this process, one after another (``local``), or as Ray
tasks across a cluster (``ray``).

With Ray, every job (a sweep run, a dense fine-tune, the dense model's latency) is a chain of two
tasks. The *build* task prunes, retrains, counts and evaluates (asking for a GPU when the recipe
retrains on CUDA); the *latency* task profiles the result and times it interleaved with the dense
model while holding the node's one ``onnxprune_profile`` resource *and every CPU of that node* (and
its GPUs when it measures on one), so nothing else Ray schedules runs beside a measurement
(:func:`measure_options`). A build task whose target is a latency budget measures too, and
reserves the node the same way. The runners set their thread counts from the profile, never from
the ``OMP_NUM_THREADS`` Ray gives its workers. Each task works in a scratch directory laid out
like OUTDIR, with a step cache seeded from the run's own records, so it computes the same
content-hashed keys a local run would.

Results reach OUTDIR by *driver write-back*, not through a shared filesystem: a finished task
returns its new step records and the bytes of the files they wrote; the driver writes the files
(atomically), then the records into ``state.json``, as each task finishes. Why: a Ray cluster need
not share a filesystem with the machine that starts the run (autoscaled cloud nodes rarely do),
``state.json`` keeps a single writer (concurrent writers on NFS would lose each other's records), and
a task that dies half-way leaves nothing in OUTDIR. The cost is that each model crosses the network
to the driver once. So a crashed worker's task is retried by Ray (``executor.max_retries``; an
exception raised in a task is never retried: an input error, bad data or a version mismatch fails
the same way every time, and a task checks its onnxprune version before any work), a killed
driver loses only the tasks still in flight, and a re-run asks the cache what is missing and submits
only that. Once everything is in the cache the pipeline replays it to build the report, with the same
code a local run uses.
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import OnnxPruneError, UnavailableError
from .cache import STATE_VERSION, CacheMiss, StepCache
from ..core import version
from .context import finetune_dense_enabled, MODELS, dense_finetuned_name, versions
from . import work, context
from ..core.model_io import model_files
from .latency_target import is_latency
import logging

#: the custom Ray resource a latency measurement holds; give each node that may measure exactly 1
PROFILE_RESOURCE = "onnxprune_profile"
#: steps that measure time (they run in the latency task, holding PROFILE_RESOURCE)
LATENCY_STEPS = ("profile", "speedup-vs-dense", "speedup-vs-float")
INSTALL = "pip install 'onnxprune[ray]'"


class VersionMismatchError(OnnxPruneError):
    """A Ray worker imports another onnxprune than the driver: its results would not be comparable."""


def check_version(driver: str) -> None:
    """Raise :class:`VersionMismatchError` when this process's onnxprune is not the driver's."""

    if version.__version__ != driver:
        raise VersionMismatchError(f"the worker on {socket.gethostname()} runs onnxprune {version.__version__}, the driver "
                                   f"{driver}: install the same version on every node")


def measuring_nodes(nodes: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{"node_id", "cpus", "gpus"}`` of every live node offering the profile resource (from ``ray.nodes()``)."""
    out = []
    for n in nodes:
        res = n.get("Resources") or {}
        if n.get("Alive", True) and res.get(PROFILE_RESOURCE, 0) >= 1:
            out.append({"node_id": n["NodeID"], "cpus": int(res.get("CPU", 0)), "gpus": int(res.get("GPU", 0))})
    return out


def measure_options(nodes: Sequence[Mapping[str, Any]], gpu: bool, index: int) -> dict[str, Any]:
    """Ray options that reserve a whole measuring node for one task: all its CPUs, its GPUs when
    ``gpu``, and its profile resource. When the measuring nodes all have the same size any of them
    may take the task; otherwise the ``index``-th task is pinned to node ``index`` mod their number
    (a request sized for one node would leave CPUs free on a larger one, or never fit a smaller one)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # lazy: ray ([ray] extra)

    sizes = {(n["cpus"], n["gpus"]) for n in nodes}
    node = nodes[index % len(nodes)]
    opts: dict[str, Any] = {"num_cpus": node["cpus"], "num_gpus": node["gpus"] if gpu else 0,
                            "resources": {PROFILE_RESOURCE: 1}}
    if len(sizes) > 1:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node["node_id"], soft=False)
    return opts


def make_executor(cfg: Any, kind: str | None = None, address: str | None = None) -> "LocalExecutor | RayExecutor":
    """The executor for a recipe's ``executor:`` settings, with ``--executor``/``--ray-address`` on top
    (an address alone means Ray). Checks that Ray is installed before any work starts."""
    kind = kind or ("ray" if address else cfg.kind)
    if kind == "local":
        if address:
            raise OnnxPruneError("--ray-address needs --executor ray")
        return LocalExecutor()
    if kind != "ray":
        raise OnnxPruneError(f"unknown executor {kind!r}: expected local or ray")
    import_ray()
    address = address or cfg.address
    check_reachable(address or os.environ.get("RAY_ADDRESS"))
    return RayExecutor(address=address, max_retries=cfg.max_retries)


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in one line, before any work, when a HOST:PORT (or ray://HOST:PORT) address does not answer:
    Ray itself keeps retrying for minutes."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise OnnxPruneError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise OnnxPruneError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                             "ray start --head, or check the address") from None


def import_ray():
    try:
        import ray  # lazy: ray ([ray] extra)
    except ImportError:
        raise UnavailableError(f"--executor ray needs the Python package 'ray': {INSTALL}") from None
    return ray


class LocalExecutor:
    """Every step in this process, in order (the pipeline's own loop does the work)."""

    remote = False


@dataclass(frozen=True)
class Job:
    """One chain of steps: a sweep run (``spec``), a dense fine-tune (``seed``) or the dense latency."""

    kind: str  # "run" | "dense-finetuned" | "dense"
    label: str
    spec: Any = None  # RunSpec
    seed: int | None = None


@dataclass
class Shared:
    """What every task needs, put in the object store once."""

    recipe: Any
    data: Any
    data_desc: Any
    profiles: list[Any]
    sens: Any
    dense: dict[str, bytes]  # models/dense.onnx (and its external data files)
    records: dict[str, Any]  # the run's step records when the tasks were submitted
    version: str = ""  # the driver's onnxprune: a task checks it before any work


def jobs_of(ctx, plan) -> list[Job]:
    jobs = [Job("dense", "dense")] + [Job("run", s.id, spec=s) for s in plan.runs]
    if finetune_dense_enabled(ctx.recipe) and ctx.data is not None:
        jobs += [Job("dense-finetuned", f"dense-finetuned-s{seed}", seed=seed) for seed in plan.seeds]
    return jobs


def final_path(ctx, job: Job) -> Path:
    name = {"dense": "dense.onnx", "run": f"{job.label}.onnx"}.get(job.kind) or dense_finetuned_name(job.seed)
    return ctx.path(MODELS, name)


def _chain(ctx, job: Job, model_path: Path, dense: Path, sens: Any, phase: str) -> Any:
    """The steps of ``job``: all of them (``full``, what the pipeline itself runs), or one task's part."""

    if phase == "latency":  # the job's model and its quantized twin (recipe quantize:)
        return work.job_latency(ctx, final_path(ctx, job), job.label, dense, own_dense=job.kind == "dense")
    latency = phase == "full"
    if job.kind == "dense":
        return work.dense_control(ctx, model_path, latency=latency)
    if job.kind == "run":
        return work.run_one(ctx, job.spec, dense, sens, latency=latency)
    return work.dense_finetune(ctx, dense, job.seed, latency=latency)


class RayExecutor:
    """Each job as Ray tasks; results written back into OUTDIR's step cache by this (driver) process."""

    remote = True

    def __init__(self, address: str | None = None, max_retries: int = 2):
        self.address = address
        self.max_retries = max_retries

    def fill(self, ctx, model_path: Path, plan, dense: Path, sens: Mapping[str, Any] | None) -> None:
        """Run every job whose steps are not all recorded yet; raise, after the others finished, if any failed."""
        ray = import_ray()
        started = self._connect(ray)
        try:
            self._fill(ray, ctx, model_path, plan, dense, sens)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray) -> bool:
        """Join the cluster (``address``, else RAY_ADDRESS) or start a one-machine instance; True if started here."""
        if ray.is_initialized():
            return False

        kw: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if self.address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=self.address, **kw)
            else:  # this machine only: it may measure, and its workers import this very onnxprune
                root = str(Path(__file__).resolve().parents[2])
                path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))
                ray.init(address="local", include_dashboard=False, resources={PROFILE_RESOURCE: 1},
                         runtime_env={"env_vars": {"PYTHONPATH": path}}, **kw)
        except Exception as exc:  # noqa: BLE001 - any connection failure is the user's setup, said in one line
            where = self.address or os.environ.get("RAY_ADDRESS") or "a local Ray instance"
            hint = ("; a cluster with token authentication also needs RAY_AUTH_MODE=token and its token here"
                    if where != "a local Ray instance" and not os.environ.get("RAY_AUTH_MODE") else "")
            raise OnnxPruneError(f"cannot start or reach Ray ({where}): {_first_line(exc)}{hint}") from None
        return True

    def _needs(self, ray, ctx) -> tuple[int, int]:
        """GPUs a build task and a latency task ask for (0 or 1); refuses a cluster that cannot run them."""
        have = ray.cluster_resources()
        rt = ctx.recipe.retrain
        train_gpus = 1 if rt.epochs > 0 and (rt.device == "cuda" or (rt.device == "auto" and have.get("GPU", 0) >= 1)) else 0
        lat_gpus = 1 if any(getattr(p, "is_gpu", False) for p in ctx.profiles) else 0
        if max(train_gpus, lat_gpus) > have.get("GPU", 0):
            raise UnavailableError("the recipe retrains or measures on CUDA but the Ray cluster has no GPU")
        if ctx.profiles and have.get(PROFILE_RESOURCE, 0) < 1:
            raise OnnxPruneError(f"no node of the Ray cluster offers the {PROFILE_RESOURCE!r} resource that latency "
                                 "measurements hold: start the nodes that may measure with ray start ... "
                                 f"--resources='{{\"{PROFILE_RESOURCE}\": 1}}'")
        if lat_gpus and ctx.profiles and not any(n["gpus"] for n in measuring_nodes(ray.nodes())):
            raise UnavailableError(f"the recipe measures on CUDA but no node offering {PROFILE_RESOURCE!r} has a GPU")
        return train_gpus, lat_gpus

    def _fill(self, ray, ctx, model_path: Path, plan, dense: Path, sens) -> None:
        train_gpus, lat_gpus = self._needs(ray, ctx)

        shared = ray.put(Shared(recipe=ctx.recipe, data=ctx.data, data_desc=ctx.data_desc, profiles=list(ctx.profiles),
                                sens=sens, dense=payload(ctx.outdir, [ctx.rel(dense)]),
                                records=dict(ctx.cache.state["steps"]), version=version.__version__))
        task = ray.remote(run_task)
        # retries are for a worker that died (crash, lost node); an exception raised in a task is not
        # retried: it comes from the input, the data or the versions and would fail the same way again
        common = {"max_retries": self.max_retries, "retry_exceptions": False}
        nodes = measuring_nodes(ray.nodes()) if ctx.profiles else []
        measured = 0
        pending: dict[Any, tuple[Job, str, bool]] = {}
        jobs = jobs_of(ctx, plan)
        for job in jobs:
            todo = self._missing(ctx, job, model_path, dense, sens)
            if todo is None:
                if job.kind != "dense":
                    ctx.progress.advance()
                continue
            phases, seed = todo
            seed_ref = ray.put(seed)
            prev = None
            for phase in phases:
                measures = phase == "latency" or (job.spec is not None and _latency_target(job.spec))
                if measures and nodes:
                    gpu = bool(lat_gpus if phase == "latency" else (lat_gpus or train_gpus))
                    opts = {**measure_options(nodes, gpu, measured), **common}
                    measured += 1
                else:
                    opts = {"num_cpus": 1, "num_gpus": train_gpus if phase == "build" else 0, **common}
                prev = task.options(**opts).remote(shared, job, phase, seed_ref, prev)
                pending[prev] = (job, phase, phase == phases[-1])
        failures: dict[str, str] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job, phase, last = pending.pop(done[0])
            try:
                res = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - a task's failure (retries spent) is reported with the others
                res = {"error": _task_error(exc)}
            if "error" in res:
                failures.setdefault(job.label, res["error"])
                continue
            ctx.cache.merge(res["records"], res["files"], res["executed"], res["skipped"])
            ctx.cache.accept(res.get("machine"))  # its measurements (new or reused) are this run's
            self._versions(ctx, res)
            ctx.progress.step(f"{job.label}: {phase} done on {res['node']['host']}")
            if last and job.kind != "dense":
                ctx.progress.advance()
        if failures:
            detail = "; ".join(f"{label}: {err}" for label, err in failures.items())
            raise OnnxPruneError(f"{len(failures)} of {len(jobs)} jobs failed on Ray ({detail}); the finished ones are "
                                 f"recorded in {ctx.cache.path} and a re-run of the same command runs only what is missing")

    @staticmethod
    def _versions(ctx, res: Mapping[str, Any]) -> None:
        """Library versions a worker used that this process did not load go to the report; versions that
        differ from this process's are said in a note."""

        mine = versions()
        for key, value in res.get("versions", {}).items():
            if key in ("platform",):
                continue
            if key not in mine:
                ctx.worker_versions.setdefault(key, value)
            elif value != mine[key]:
                ctx.notes.append(f"{res['node']['host']} ran {key} {value}, this machine {mine[key]}")

    def _missing(self, ctx, job: Job, model_path: Path, dense: Path, sens) -> tuple[tuple[str, ...], dict] | None:
        """None when every step of ``job`` is recorded (those count as reused), else the task phases it
        needs and the files of the recorded steps it can start from."""
        with ctx.cache.replay() as hits:
            try:
                _chain(ctx, job, model_path, dense, sens, "full")
                miss = None
            except CacheMiss as exc:
                miss = exc.step
            keys = list(hits)
        records = {k: ctx.cache.state["steps"][k] for k in keys}
        names = [r["step"] for r in records.values()]
        # hits the tasks will not replay count as reused here; the dense build ran (and counted) on the driver
        if job.kind == "dense":
            names = [n for n in names if n in LATENCY_STEPS]
        phases = ("latency",) if miss in LATENCY_STEPS or job.kind == "dense" else ("build", "latency")
        if not ctx.profiles:
            phases = tuple(p for p in phases if p != "latency")
        if miss is None:
            ctx.cache.skipped.extend(names)
            return None
        if phases == ("latency",):
            ctx.cache.skipped.extend(n for n in names if n not in LATENCY_STEPS)
        if phases == ("latency",):  # the latency task also times what the build wrote after the first miss (a twin)
            with ctx.cache.replay() as built:
                try:
                    _chain(ctx, job, model_path, dense, sens, "build")
                except CacheMiss:
                    pass
                records.update({k: ctx.cache.state["steps"][k] for k in built})
        files = payload(ctx.outdir, [rel for r in records.values() for rel in r.get("files", {}) if rel != ctx.rel(dense)])
        return phases, {"files": files}


def payload(root: Path, rels: list[str]) -> dict[str, bytes]:
    """The bytes of files under ``root`` by relative path; a model brings its external data files along."""

    out: dict[str, bytes] = {}
    for rel in rels:
        for f in model_files(root / rel) if rel.endswith(".onnx") else [root / rel]:
            out[str(f.relative_to(root))] = f.read_bytes()
    return out


def _latency_target(spec) -> bool:
    return any(is_latency(s) for s in spec.stages)


def run_task(shared: Shared, job: Job, phase: str, seed: Mapping[str, Any], prior: Mapping[str, Any] | None) -> dict[str, Any]:
    """One phase of one job on a Ray worker, in a scratch copy of the run directory; returns the new step
    records and the bytes of the files they wrote. The onnxprune version is checked first, before any
    work. An input error (OnnxPruneError, a version mismatch included) is returned, not raised: it
    would fail the same way on every retry."""

    if prior is not None and "error" in prior:
        return dict(prior)
    try:
        check_version(shared.version)
    except VersionMismatchError as exc:
        return {"error": str(exc)}
    records = {**shared.records, **((prior or {}).get("records") or {})}
    files = {**seed["files"], **((prior or {}).get("files") or {})}
    with tempfile.TemporaryDirectory(prefix="onnxprune-task-") as tmp:
        out = Path(tmp)
        for rel, data in {**shared.dense, **files}.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        (out / context.WORK).mkdir(exist_ok=True)
        cache = StepCache(outdir=out, state={"version": STATE_VERSION, "steps": dict(records)})
        ctx = context.Context(recipe=shared.recipe, outdir=out, cache=cache, data=shared.data, data_desc=shared.data_desc,
                               profiles=shared.profiles, progress=context.Progress(False))
        try:
            _chain(ctx, job, out / "no-input-model", out / context.MODELS / "dense.onnx", shared.sens, phase)
        except OnnxPruneError as exc:
            return {"error": str(exc)}
        new = {k: v for k, v in cache.state["steps"].items() if k not in records}
        written = payload(out, [rel for r in new.values() for rel in r["files"]])
        return {"records": new, "files": written, "executed": cache.executed, "skipped": cache.skipped,
                "node": context.node_info(), "versions": context.versions(), "machine": cache.own_machine()}


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _task_error(exc: BaseException) -> str:
    """A failed task in one line: the original exception for an error raised in the task, else Ray's reason."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"
