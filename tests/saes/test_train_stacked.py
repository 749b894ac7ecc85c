"""The stacked engine's step (issue 29) against the step it replaced, kept as the baseline of
benchmarks/bench_train_step.py: the same losses, gradients and parameters to rounding, with and
without dead latents, AuxK skipped / on the dead latents alone / dense; the host-side bound that
decides it; and no host sync inside a step."""
import collections
import importlib.util
import pathlib
import shutil

import pytest
import torch
import torch.utils._python_dispatch

from saeflow.saes.train import StackedTrainer, TrainConfig
from saeflow.saes.train import stacked_kernels as sk

ROOT = pathlib.Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step",
                                                  ROOT / "benchmarks/bench_train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup(dt, device=CPU, **kw):
    """A 3-SAE stack on inputs that leave ~100 of 256 latents per SAE dead after two steps."""
    cfg = TrainConfig(**{"width": 256, "k": 2, "tokens": 4096, "batch_size": 64, "lr": 1e-3,
                         "dead_tokens": 64, "aux_activation": "linear", **kw})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1024, 16, generator=g) * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 0.5
    x = x.to(device)
    make = lambda: StackedTrainer(16, cfg, 16, device, [3, 11, 5], dt)
    return make, x


def _grads(t):
    return [p.grad.clone() for p in t.params]


CASES = [(dt, arch, act, aux_k) for dt in (torch.float32, torch.bfloat16)
         for arch in ("topk", "batchtopk") for act in ("linear", "relu") for aux_k in (8, 96, 256)]


@pytest.mark.parametrize("dt,arch,act,aux_k", CASES)
def test_each_step_has_the_old_formulas_loss_and_gradients(bench, dt, arch, act, aux_k):
    """Along a 10-step trajectory: from the same state, the old step's and the new step's loss
    and all four parameter gradients agree (fp32: to 1e-5; bf16: the old step summed the bias
    gradients in bf16, the new one in fp32: within 1% of the largest entry, ~2.5 bf16 ulps).
    aux_k 8: dense AuxK, 256: on the dead latents alone,
    96: both (about 100 dead per SAE)."""
    make, x = _setup(dt, architecture=arch, aux_activation=act, aux_k=aux_k)
    t = make()
    t.init_from(x)
    paths = collections.Counter()
    tol = dict(atol=1e-5, rtol=1e-5) if dt == torch.float32 else dict(atol=1e-2, rtol=2e-2)
    for s in range(10):
        xb = x[:, s * 64:(s + 1) * 64]
        loss_old, *_ = bench.old_stacked_loss(t, xb)
        for p in t.params:
            p.grad = None
        loss_old.backward()
        old = _grads(t)
        loss, st = t._loss(xb)
        for p in t.params:
            p.grad = None
        loss.backward()
        paths[t.aux_path] += 1
        torch.testing.assert_close(loss, loss_old, atol=1e-6, rtol=1e-5)
        for name, a, b in zip(("W_enc", "W_dec", "b_enc", "b_dec"), old, _grads(t), strict=True):
            scale = float(a.abs().max())  # bf16: relative to the largest gradient entry
            torch.testing.assert_close(b, a, atol=tol["atol"] * max(scale, 1e-3),
                                       rtol=tol["rtol"], msg=name)
        t._update(st)
        t.step_i += 1
        t._bound.stepped(xb.shape[1])
        if st.dead.any():  # AuxK's gradient reaches dead latents' decoder rows (both formulas)
            assert old[1][st.dead].abs().sum() > 0
    assert paths["skip"] == 2  # nothing can be dead before dead_tokens
    assert paths["dense" if aux_k == 8 else "compact"] > 0
    if aux_k == 96:
        assert paths["dense"] > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("aux_k", [8, 256])
def test_fp32_trajectory_equals_the_old_step(bench, arch, aux_k):
    """12 steps of the old and the new step from one init (fp32): the same dead-latent
    bookkeeping, metrics and parameters to rounding."""
    make, x = _setup(torch.float32, architecture=arch, aux_k=aux_k)
    old, new = make(), make()
    old.init_from(x)
    new.init_from(x)
    for s in range(12):
        xb = x[:, s * 64:(s + 1) * 64]
        bench.old_stacked_step(old, xb)
        new.step(xb)
        assert torch.equal(new.since_fired, old.since_fired)
        for a, b in zip(old.metrics(), new.metrics(), strict=True):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
        for a, b in zip(old.params, new.params, strict=True):
            torch.testing.assert_close(b.detach(), a.detach(), atol=1e-5, rtol=1e-5)
    assert new.metrics()[0]["aux"] > 0


class _FakeEvent:
    """A CUDA event stand-in: complete only when the test says so."""

    def __init__(self):
        self.done = False

    def record(self):
        self.done = False

    def query(self):
        return self.done


def test_dead_bound_is_an_upper_bound_with_lagged_reads():
    """since_fired evolves like training's (random firing, a resample lowering it, uneven last
    batch); reads complete late; whatever the plan says holds for the true state."""
    g = torch.Generator().manual_seed(1)
    S, n, B, dead = 4, 200, 64, 400
    sf = torch.zeros(S, n, dtype=torch.long)
    bound = sk.DeadBound(sf, dead, B, horizon=3, slots=2)
    events = [_FakeEvent() for _ in bound._events]
    bound._events = events
    seen = collections.Counter()
    for step in range(300):
        held = bound.valid()
        if step % 37 == 36:  # a resample: some dead latents back to 0
            sf[:, :50].masked_fill_(sf[:, :50] > dead, 0)
            bound.lowered(held)
        if step % 4 == 0:  # reads land late and in bursts
            for e in events:
                e.done = True
        plan, m = bound.plan(aux_k=30)
        seen[plan] += 1
        true_dead = (sf > dead).sum(1)  # [S]
        if plan == "skip":
            assert int(true_dead.max()) == 0
        elif plan == "compact":
            assert 0 < m <= 30 and int(true_dead.max()) <= m
        b = B if step % 50 else 17  # an uneven batch now and then
        p_fire = 0.02 if step < 150 else 0.5  # many dead, then few
        sf += b
        sf.masked_fill_(torch.rand(S, n, generator=g) < p_fire, 0)
        bound.stepped(b)
    assert seen["skip"] and seen["compact"] and seen["dense"]


def test_an_outside_write_voids_the_bound_until_refreshed():
    make, x = _setup(torch.float32)
    t = make()
    t.init_from(x)
    t.step(x[:, :64])
    t.step(x[:, 64:128])
    assert t.aux_path == "skip"
    with torch.no_grad():
        t.since_fired[:, :5] = 10**6  # five dead latents the bound does not know of
    t.step(x[:, 128:192])
    assert t.aux_path == "dense" and t.metrics()[0]["aux"] > 0
    with torch.no_grad():
        t.since_fired[:] = 0
    t.refresh_dead_bound()
    t.step(x[:, 192:256])
    assert t.aux_path == "skip"
    # a checkpoint's since_fired comes with a new bound
    other = make()
    other.load_state_dicts([t.state_dict(i) for i in range(3)])
    with torch.no_grad():
        other.since_fired[:, :3] = 10**6
    other.load_state_dicts([t.state_dict(i) for i in range(3)])
    assert other._bound.plan(aux_k=8) == ("skip", 0)


FORBIDDEN = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique",
             "_unique2", "item"}


class _NoSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Raises on the ops that make the host wait for a device: a scalar read, and ops whose
    output size depends on the data (nonzero, boolean-mask indexing, masked_select)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in FORBIDDEN:
            raise AssertionError(f"host sync in step(): aten.{name}")
        if name == "index":
            idx = args[1] if len(args) > 1 else []
            if any(i is not None and i.dtype == torch.bool for i in idx):
                raise AssertionError("host sync in step(): boolean-mask indexing")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("aux_k", [8, 256])
def test_no_host_sync_in_a_step(test_device, monkeypatch, aux_k):
    """On CUDA: torch's sync debug mode in "error" over steps with and without dead latents.
    On a CPU (no device to wait for): no scalar reads, .cpu()/.tolist()/.numpy(), or
    data-dependent shapes in the step, by a dispatch mode and patched Tensor methods."""
    dev = torch.device(test_device)
    make, x = _setup(torch.float32, device=dev, aux_k=aux_k)
    t = make()
    t.init_from(x)
    t.step(x[:, :64])  # warm-up (allocations, a compiled code's first call)
    paths = set()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for s in range(1, 8):
                t.step(x[:, s * 64:(s + 1) * 64])
                paths.add(t.aux_path)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        def refuse(self, *a, **k):
            raise AssertionError("host read of a tensor in step()")
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                     "__index__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        with _NoSync():
            for s in range(1, 8):
                t.step(x[:, s * 64:(s + 1) * 64])
                paths.add(t.aux_path)
        monkeypatch.undo()
    assert {"skip", "dense" if aux_k == 8 else "compact"} <= paths
    assert all(m["aux"] >= 0 for m in t.metrics())


def test_compiled_code_falls_back_to_eager(monkeypatch):
    """torch.compile is opt-in (SAEFLOW_COMPILE=1, CUDA only); a failing compile gives eager
    results with a warning."""
    monkeypatch.setenv("SAEFLOW_COMPILE", "1")
    make, x = _setup(torch.float32)
    assert make()._code_fn.fn is None  # not on a CPU

    def broken(*a, **k):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    fn = sk.CodeFn(True)
    pre = torch.randn(2, 8, 32, requires_grad=True)
    with pytest.warns(UserWarning, match="torch.compile of the TopK code failed"):
        z, vals = fn(pre, 3, False)
    z0, vals0 = sk.code(pre, 3, False)
    assert torch.equal(z, z0) and torch.equal(vals, vals0) and fn.fn is None


@pytest.mark.skipif(not shutil.which("cc") and not shutil.which("g++"),
                    reason="torch.compile on the CPU needs a C compiler")
def test_the_compiled_code_trains_exactly_as_eager():
    """SAEFLOW_COMPILE's path, forced on the CPU (inductor's C++ backend, not CUDA's Triton):
    the graph compiles, nothing falls back, and three steps with dead latents give the eager
    trainer's parameters bit for bit."""
    make, x = _setup(torch.float32)
    ts = [make(), make()]
    ts[1]._code_fn = sk.CodeFn(True)
    for t in ts:
        t.init_from(x)
        for s in range(3):
            t.step(x[:, s * 64:(s + 1) * 64])
    assert ts[1]._code_fn.fn is not None and ts[1]._code_fn._probed
    for a, b in zip(ts[0].params, ts[1].params):
        assert torch.equal(a, b)
