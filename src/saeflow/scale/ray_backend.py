"""The Ray side of saeflow.scale: connecting, checking the workers' versions, running the shards
of a corpus pass and any list of independent tasks (the flow's layers, training groups).

Imported only when a stage is asked for workers. Retries are Ray's own (`max_retries` for a
worker that died, `retry_exceptions` for one that raised); the driver only submits at most
`workers` tasks at once, merges the finished shards in shard order and checkpoints the merge.
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator

import torch

from saeflow._version import __version__
from saeflow.errors import MissingDependencyError, ScaleError
from saeflow.lm.model import EMBEDDED_NAME, load_model, resolve_dtype
from saeflow.saes.scan import (
    check_available,
    encoded_batches,
    in_pass_order,
    load_saes,
    resumable_state,
)
from saeflow.scale import ScaleConfig
from saeflow.scale.merge import load_shard, merge_in_order, shard_ranges
from saeflow.store import atomic_path

# What the last sharded pass on Ray spent where (benchmarks/bench_scale.py reads it).
last_job: dict = {}

# Tests set this to {"shard": k, "marker": path, "always": bool}: the worker running shard k
# kills its own process after its first batch (once, or on every try when "always").
FAULT_INJECTION: dict | None = None


def local_versions() -> dict[str, str]:
    return {"saeflow": __version__, "torch": torch.__version__.split("+")[0]}


def _describe(v: dict) -> str:
    return " / ".join(f"{k} {v[k]}" for k in sorted(v))


def _check_versions(driver: dict, where: str) -> None:
    mine = local_versions()
    if mine != driver:
        raise ScaleError(f"refusing worker {where}: it has {_describe(mine)}, the driver has "
                         f"{_describe(driver)}; install the same versions on every node")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("--workers needs Ray: pip install 'saeflow[ray]'") from None
    return ray


def _reachable(address: str) -> None:
    """One clear line, before anything is written, when nothing listens at the address."""
    if address == "auto":
        return
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host:
        host, port = host_port, "10001" if address.startswith("ray://") else "6379"
    try:
        speaks_grpc = _speaks_grpc(host, int(port))
    except (OSError, ValueError) as e:
        raise ScaleError(f"cannot reach the Ray cluster at {address} ({e.__class__.__name__}: "
                         f"{e}); start it with `ray start --head` or fix --ray-address") from None
    if not speaks_grpc:  # ray.init would retry it for minutes, tens of warnings on the way
        raise ScaleError(f"{address} answers, but not as Ray (no gRPC server there); give the "
                         f"address `ray start --head` printed (host:6379, or ray://host:10001)")


# An HTTP/2 client preface and an empty SETTINGS frame: every gRPC server (Ray's GCS and its
# client server are gRPC) answers with a SETTINGS frame of its own at once.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4


def _speaks_grpc(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether the TCP server at host:port speaks HTTP/2 (so gRPC, so possibly Ray): its first
    frame is SETTINGS. OSError when nothing listens; False for any other server (an HTTP/1
    answer, a closed connection, or silence for `timeout` seconds)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    return False
                head += chunk
        except (socket.timeout, ConnectionError):
            return False
    return head[3] == _H2_SETTINGS


def connect(scale: ScaleConfig):
    """Ray, initialised: the running instance, the cluster at scale.ray_address, or a local
    Ray with scale.workers CPUs. Then every worker node's versions are checked."""
    ray = _import_ray()
    if scale.ray_address:
        _reachable(scale.ray_address)
    if not ray.is_initialized():
        if scale.ray_address:
            try:
                ray.init(address=scale.ray_address, logging_level="ERROR",
                         log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - Ray raises many kinds; one line for all
                raise ScaleError(f"cannot join the Ray cluster at {scale.ray_address}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                 ) from None
        else:
            ray.init(num_cpus=scale.workers, include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False)
    _check_cluster_versions(ray, scale)
    return ray


def _node_versions() -> tuple[str, dict]:
    return socket.gethostname(), local_versions()


def _check_cluster_versions(ray, scale: ScaleConfig) -> None:
    driver = local_versions()
    probe = ray.remote(_node_versions).options(num_cpus=0, scheduling_strategy="SPREAD")
    for host, v in ray.get([probe.remote() for _ in range(max(1, scale.workers))]):
        if v != driver:
            raise ScaleError(f"refusing the workers on {host}: they have {_describe(v)}, the "
                             f"driver has {_describe(driver)}; install the same versions on "
                             f"every node")


def _task_options(ray, scale: ScaleConfig) -> dict:
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"max_retries": scale.retries - 1, "retry_exceptions": True, "num_cpus": 1,
            "num_gpus": 1 if gpus else 0}


# --- the worker side -----------------------------------------------------------------------
_MODELS: "OrderedDict[tuple, Any]" = OrderedDict()  # per worker process: reused across tasks


def model_recipe(model) -> tuple[str, str, tuple]:
    """(load_model spec, dtype name, fingerprint) that rebuild `model` on a worker. Workers
    load the model from where it came from, so one changed in memory after loading (weights,
    dtype, train mode) would give other results: the fingerprint lets the worker refuse it."""

    if model.name == EMBEDDED_NAME:
        spec = "embedded"
    elif model.source.startswith("hub:"):
        spec = model.source[4:]
    else:
        spec = model.source
    return (spec, str(next(model.hf.parameters()).dtype).removeprefix("torch."),
            model_fingerprint(model))


def model_fingerprint(model) -> tuple:
    """(train mode, dtypes, the float64 sum of every weight): cheap, and enough to tell a
    model changed in memory from the one on disk."""
    with torch.no_grad():
        total = sum(float(p.detach().double().sum()) for p in model.hf.parameters())
    dtypes = sorted({str(p.dtype) for p in model.hf.parameters()})
    return (bool(model.hf.training), tuple(dtypes), total)


def _same_model(a: tuple, b: tuple) -> bool:
    """Fingerprints equal, the weight sums to 1e-9 (a GPU sums in another order)."""
    return a[:2] == b[:2] and abs(a[2] - b[2]) <= 1e-9 * max(1.0, abs(a[2]))


def _worker_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_model(recipe: tuple):
    """The model of `recipe`, loaded once per worker process; refused when it differs from the
    driver's (the fingerprint is checked on every task, against the cached one too)."""

    key = (recipe[0], recipe[1], _worker_device())
    if key not in _MODELS:
        while _MODELS:  # one model per worker process
            _MODELS.popitem()
        model = load_model(recipe[0], device=key[2], dtype=recipe[1], progress=False)
        _MODELS[key] = (model, model_fingerprint(model))
    model, fp = _MODELS[key]
    if len(recipe) > 2 and not _same_model(fp, recipe[2]):
        raise ScaleError(f"the driver's model differs from {recipe[0]} as a worker loads it "
                         f"(fingerprint {recipe[2]} vs {fp}): it was changed in memory after "
                         f"loading; workers load it from disk, so pass a model as loaded, or "
                         f"save the changed one and load that")
    return model


def _run_shard(job: dict, k: int, start: int, stop: int, driver: dict, fault: dict | None):
    _check_versions(driver, socket.gethostname())
    t0 = time.perf_counter()
    model = worker_model(job["model"])
    spec, slots = job["spec"], job["slots"]
    saes = load_saes(job["pack"], slots, model.device,
                     resolve_dtype(spec.encoder_dtype, model.device))
    acc = job["make_shard"](k, model.device)
    tokens = 0
    for i, z, b, content, acts in encoded_batches(model, saes, slots, spec, start=start,
                                                  stop=stop,
                                                  codes_on_device=job["codes_on_device"]):
        if fault and fault["shard"] == k and i > start:
            marker = Path(fault["marker"])
            if fault.get("always") or not marker.exists():
                marker.write_text(f"{marker.read_text() if marker.exists() else ''}x")
                os.kill(os.getpid(), 9)  # a worker killed mid-shard
        acc.on_batch(z, b, content, acts)
        tokens += int(content.sum())
    return k, acc.state(), tokens, time.perf_counter() - t0


def _fault() -> dict | None:
    return FAULT_INJECTION


# --- the driver side -----------------------------------------------------------------------
@dataclass
class _Merge:
    """The driver's merge of finished shards, in shard order, and its checkpoint: the same
    state file as the in-process pass, so a killed driver resumes from the shards merged."""

    make_shard: Callable
    device: Any
    per: int  # batches per shard
    state_file: Path
    identity: dict
    total: Any = None  # the merged shards (None until the first: merge_in_order)
    shard: int = 0  # the next shard to merge
    merged_tokens: int = 0
    seconds_before: float = 0.0  # pass time spent before an interruption
    waiting: dict = field(default_factory=dict)  # shard -> (state, tokens): done, not merged

    def resume(self, st: dict | None, error: type[Exception]) -> None:
        if st is None:
            return
        c = st["consumer"]
        if c.get("per") != self.per:
            raise error(f"{self.state_file} was cut into shards of {c.get('per')} batches, not "
                        f"{self.per}; resume with the same --shard-tokens (or --force)")
        # a shard merged part-way (in-process run) is redone
        self.total = load_shard(self.make_shard, c["shard"] - 1, self.device, c["total"])
        self.shard, self.merged_tokens = c["shard"], c["merged_tokens"]
        self.seconds_before = float(st.get("seconds", 0.0))

    def add(self, k: int, state: dict, tokens: int) -> None:
        """Shard k is done; merge it and every done shard after it that now follows in order."""
        self.waiting[k] = (state, tokens)
        while self.shard in self.waiting:
            state, tokens = self.waiting.pop(self.shard)
            self.total = merge_in_order(self.total, load_shard(self.make_shard, self.shard,
                                                               self.device, state))
            self.shard += 1
            self.merged_tokens += tokens

    def save(self, seconds: float) -> None:
        cur = {"shard": self.shard, "in_shard": 0, "merged_tokens": self.merged_tokens,
               "tokens": self.merged_tokens}
        with atomic_path(self.state_file) as tmp:
            torch.save({"identity": self.identity, "batches": self.shard * self.per,
                        "tokens": self.merged_tokens, "seconds": self.seconds_before + seconds,
                        "consumer": {"total": None if self.total is None else self.total.state(),
                                     "local": self.make_shard(0, self.device).state(),
                                     "per": self.per, **cur}}, tmp)


def _completed(ray, submit: Callable[[Any], Any], items: list, workers: int,
               failed: Callable[[Any, BaseException], str]
               ) -> Generator[tuple[Any, Any, float], None, None]:
    """(item, result, seconds spent fetching it) for each of `items` as its task finishes, at
    most `workers` tasks at once (submit(item) starts one). A task that failed after every
    retry stops the job: its own ScaleError, or ScaleError(failed(item, cause)). Close the
    generator (contextlib.closing) to cancel the tasks still running."""
    pending = list(items)
    running: dict = {}  # ref -> item
    try:
        while pending or running:
            while pending and len(running) < workers:
                item = pending.pop(0)
                running[submit(item)] = item
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                item = running.pop(ref)
                t_get = time.perf_counter()
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the task's error, after every retry
                    cause = _cause(e)
                    if isinstance(cause, ScaleError):
                        raise cause from None
                    raise ScaleError(failed(item, cause)) from None
                yield item, result, time.perf_counter() - t_get
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def run_sharded(model, pack, slots, spec, state_file: Path, identity: dict,
                make_shard: Callable, per: int, scale: ScaleConfig, *, force: bool,
                progress: bool, desc: str, codes_on_device: bool,
                error: type[Exception]) -> dict:
    """The corpus pass on Ray: shards of `per` batches go to at most scale.workers tasks at
    once; finished shards are merged in shard order and the merge is checkpointed (the same
    state file as the in-process pass), so a killed driver resumes from the shards merged."""
    from tqdm.auto import tqdm

    ray = connect(scale)  # before anything is written: an unreachable cluster leaves no trace
    pack.check_model(model)
    slots = in_pass_order(slots)
    dev = model.device
    merged = _Merge(make_shard, dev, per, state_file, identity)
    merged.resume(resumable_state(state_file, identity, force, error), error)
    shards = shard_ranges(check_available(model.tokenizer, spec, error), per, merged.shard)
    job = ray.put({"model": model_recipe(model), "pack": shippable(pack), "slots": slots,
                   "spec": spec, "make_shard": make_shard, "codes_on_device": codes_on_device})
    task = ray.remote(_run_shard).options(**_task_options(ray, scale))
    driver, fault = local_versions(), _fault()

    def failed(shard: tuple[int, int, int], cause: BaseException) -> str:
        k, a, b = shard
        return (f"{desc}: shard {k} (batches {a}-{b - 1}) failed {scale.retries} times "
                f"({cause}); the {merged.shard} shards merged before it are kept in "
                f"{state_file}: run the same command to resume")

    t0 = time.time()
    bar = tqdm(total=spec.tokens, initial=merged.merged_tokens, desc=f"{desc} x{scale.workers}",
               unit="tok", disable=not progress, smoothing=0.05)
    last = time.perf_counter()
    merge_s = fetch_s = 0.0  # the driver's merging, and its fetching of finished shards
    task_s: list[float] = []
    try:
        with contextlib.closing(_completed(ray, lambda sh: task.remote(job, *sh, driver, fault),
                                           shards, scale.workers, failed)) as finished:
            for (k, _, _), (_, state, n, secs), fetch in finished:
                fetch_s += fetch
                task_s.append(secs)
                bar.update(n)
                t_merge = time.perf_counter()
                merged.add(k, state, n)
                merge_s += time.perf_counter() - t_merge
                if time.perf_counter() - last > spec.checkpoint_every_s:
                    merged.save(time.time() - t0)
                    last = time.perf_counter()
    finally:
        bar.close()
        if merged.shard > 0 or state_file.is_file():
            merged.save(time.time() - t0)  # the merged state: the same command resumes here
    total = merged.total
    if total is None:  # no shard at all (cannot happen past check_available): empty sums
        total = make_shard(0, dev)
    saes = load_saes(pack, slots, dev, resolve_dtype(spec.encoder_dtype, dev))
    last_job.clear()
    last_job.update({"desc": desc, "workers": scale.workers, "shards": len(shards),
                     "seconds": time.time() - t0, "merge_seconds": merge_s,
                     "fetch_seconds": fetch_s,
                     "task_seconds": task_s})
    return {"tokens": merged.merged_tokens, "seconds": merged.seconds_before + time.time() - t0,
            "saes": saes, "total": total}


def _cause(e: Exception) -> BaseException:
    """The worker's own exception inside Ray's wrapper (or the wrapper, for a dead worker)."""
    inner = getattr(e, "cause", None)
    if isinstance(inner, BaseException):
        return inner
    return _Short(e)


class _Short(Exception):
    def __init__(self, e: Exception):
        lines = [x for x in str(e).splitlines() if x.strip()]
        super().__init__(f"{type(e).__name__}: {lines[0] if lines else ''}"[:300])


def shippable(pack):
    """The pack without its in-memory SAE cache (workers load what they need)."""
    p = copy.copy(pack)
    p._cache = OrderedDict()
    return p


# --- independent tasks (flow layers, training groups) --------------------------------------
def run_tasks(fn: Callable, args: list[tuple], scale: ScaleConfig, *, desc: str,
              on_result: Callable[[int, Any], None], progress: bool = True,
              weights: list[float] | None = None) -> None:
    """fn(*args[i]) for every i on Ray, at most scale.workers at once; on_result(i, result) on
    the driver as each finishes (in any order). A task that fails scale.retries times stops
    the job naming it; results handed to on_result before are kept by the caller."""
    from tqdm.auto import tqdm

    ray = connect(scale)
    task = ray.remote(_call_checked).options(**_task_options(ray, scale))
    driver = local_versions()
    w = weights or [1.0] * len(args)
    bar = tqdm(total=sum(w), desc=f"{desc} x{scale.workers}", disable=not progress)

    def failed(i: int, cause: BaseException) -> str:
        return (f"{desc}: task {i} failed {scale.retries} times ({cause}); the finished ones "
                f"are kept: run the same command to resume")

    try:
        with contextlib.closing(_completed(ray, lambda i: task.remote(fn, args[i], driver),
                                           list(range(len(args))), scale.workers,
                                           failed)) as finished:
            for i, result, _ in finished:
                on_result(i, result)
                bar.update(w[i])
    finally:
        bar.close()


def _call_checked(fn: Callable, args: tuple, driver: dict):
    _check_versions(driver, socket.gethostname())
    return fn(*args)
