"""Eval's pass accumulators (saes/evaluate.py, issue 29): reconstruction and firing sums kept
on the device, stacked by width, with no host sync in a batch; the numbers are those of one
SAE at a time with Python float sums (bit for bit on the CPU), and the state format is the
one of every saeflow version."""
import io

import pytest
import torch
from fixtures import count_syncs

from saeflow.ids import Slot
from saeflow.saes import evaluate
from saeflow.saes.evaluate import _Firing, _Reconstruction
from saeflow.saes.sae import random_sae

# two input widths and two SAE widths, TopK and ReLU
SAES = {Slot("resid_post", 0): (16, 40, "topk"), Slot("resid_post", 1): (16, 40, "relu"),
        Slot("mlp_out", 0): (16, 24, "topk"), Slot("attn_z", 0): (12, 24, "relu")}


def _plan(dev):
    saes = {s: random_sae(d_in, d, arch, k=4 if arch == "topk" else None, seed=i).to(dev)
            for i, (s, (d_in, d, arch)) in enumerate(SAES.items())}
    return {"slots": sorted(SAES), "sae_of": saes.__getitem__,
            "d": {s: SAES[s][1] for s in SAES}, "d_in": {s: SAES[s][0] for s in SAES}}


def _batches(n, dtype, B=3, T=10):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        acts = {s: (torch.randn(B, T, d_in, generator=g) * 3).to(dtype)
                for s, (d_in, _, _) in SAES.items()}
        z = {s: torch.relu(torch.randn(B, T, d, generator=g) - 1) for s, (_, d, _) in SAES.items()}
        content = torch.rand(B, T, generator=g) > 0.2
        out.append((z, content, acts))
    return out


def _reference(plan, batches):
    """The sums one SAE at a time: float32 sums read as Python floats and added, float64
    dimension sums taken from the first batch and added (eval before issue 29)."""
    ref = {s: dict(sse=0.0, sum_sq=0.0, n=0, l0_sum=0.0, x_sum=None, sq_dim=None, sse_dim=None)
           for s in plan["slots"]}
    fire = {s: torch.zeros(plan["d"][s], dtype=torch.long) for s in plan["slots"]}
    for z, content, acts in batches:
        for s in plan["slots"]:
            x = acts[s][content].float()
            sae = plan["sae_of"](s)
            code = sae.encode(x)
            err = sae.decode(code) - x
            xd, r = x.double(), ref[s]
            r["sse"] += float(err.pow(2).sum())
            r["sum_sq"] += float(x.pow(2).sum())
            r["n"] += x.shape[0]
            r["l0_sum"] += float((code > 0).sum())
            for k, v in (("x_sum", xd.sum(0)), ("sq_dim", xd.pow(2).sum(0)),
                         ("sse_dim", err.double().pow(2).sum(0))):
                r[k] = v.clone() if r[k] is None else r[k] + v
            fire[s] += (z[s][content] > 0).sum(0)
    return ref, fire


def _state_roundtrip(st):
    buf = io.BytesIO()
    torch.save(st, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_sums_equal_one_sae_at_a_time_and_keep_their_format(test_device, monkeypatch,
                                                                  dtype):
    dev = torch.device(test_device)
    monkeypatch.setattr(evaluate, "STACK_ELEMENTS", 300)  # stacks in chunks of SAEs
    plan = _plan(dev)
    batches = _batches(4, dtype)
    on_dev = [({s: v.to(dev) for s, v in z.items()}, c, {s: v.to(dev) for s, v in a.items()})
              for z, c, a in batches]
    rec, fire = _Reconstruction(plan, 0, dev), _Firing(plan, 0, dev)
    empty = rec.state()
    assert list(empty[str(Slot("mlp_out", 0))]) == ["sse", "sum_sq", "n", "l0_sum", "x_sum",
                                                    "sq_dim", "sse_dim"]
    assert all(v["x_sum"] is None and v["sse"] == 0.0 and v["n"] == 0 for v in empty.values())
    for z, c, a in on_dev[:2]:
        rec.on_batch(z, None, c, a)
        fire.on_batch(z, None, c, a)
    rec2, fire2 = _Reconstruction(plan, 0, dev), _Firing(plan, 0, dev)
    rec2.load(_state_roundtrip(empty))  # a state saved before any batch
    for z, c, a in on_dev[2:]:
        rec2.on_batch(z, None, c, a)
        fire2.on_batch(z, None, c, a)
    total, total_fire = _Reconstruction(plan, 0, dev), _Firing(plan, 0, dev)
    total.load(_state_roundtrip(rec.state()))
    total_fire.load(_state_roundtrip(fire.state()))
    total.merge(rec2)
    total_fire.merge(fire2)

    ref, ref_fire = _reference({**plan, "sae_of": lambda s: plan["sae_of"](s).to("cpu")},
                               batches[:2])
    ref2, ref_fire2 = _reference({**plan, "sae_of": lambda s: plan["sae_of"](s).to("cpu")},
                                 batches[2:])
    exact = dev.type == "cpu"
    st, fst = total.state(), total_fire.state()
    for s in plan["slots"]:
        mine, a, b = st[str(Slot.of(s))], ref[s], ref2[s]
        assert mine["n"] == a["n"] + b["n"]
        for k in ("sse", "sum_sq", "l0_sum"):
            assert mine[k] == (a[k] + b[k] if exact else pytest.approx(a[k] + b[k], rel=1e-6)), k
        for k in ("x_sum", "sq_dim", "sse_dim"):
            v = mine[k]
            assert v.device.type == "cpu" and v.dtype == torch.float64
            assert v.untyped_storage().nbytes() == v.numel() * 8  # its own memory
            if exact:
                assert torch.equal(v, a[k] + b[k]), (s, k)
            else:
                torch.testing.assert_close(v, a[k] + b[k], rtol=1e-6, atol=1e-9)
        f = fst[str(Slot.of(s))]
        assert f.untyped_storage().nbytes() == f.numel() * 8
        assert torch.equal(f, ref_fire[s] + ref_fire2[s])
    rows = total.acc
    assert rows[Slot("attn_z", 0)].n == st[str(Slot("attn_z", 0))]["n"]


def test_an_eval_batch_makes_no_host_sync(test_device):
    """The sums stay on the device (on the CPU the content rows' nonzero counts: in a pass it
    runs on the host, where content is)."""
    dev = torch.device(test_device)
    plan = _plan(dev)
    z, c, a = _batches(1, torch.float32)[0]
    z, a = {s: v.to(dev) for s, v in z.items()}, {s: v.to(dev) for s, v in a.items()}
    rec, fire = _Reconstruction(plan, 0, dev), _Firing(plan, 0, dev)
    rec.on_batch(z, None, c, a)  # warm-up
    host = dev.type == "cpu"
    assert count_syncs(dev, lambda: rec.on_batch(z, None, c, a)) == host
    assert count_syncs(dev, lambda: fire.on_batch(z, None, c, a)) == host
