"""Quality of every SAE of a pack on held-out text.

Pass 1 (one forward per batch, all SAEs): FVU and mean L0 on `tokens` held-out tokens; the
firing counts go on to `dead_tokens` (50k by default), so that the dead fraction (never active on
those tokens) and the dense fraction (active on more than 10% of them) are not an artefact of a
short sample: a latent that fires once in 20k tokens is alive, and 5k tokens would call it dead.
Pass 2 (one forward per SAE per batch): the SAE's reconstruction replaces the activation at its
position, on document tokens (BOS and separators keep their own activations, as SAEs are
trained without them); we report the change of next-token cross-entropy (ΔCE) and the KL
divergence from the clean next-token distribution, each with a 95% bootstrap interval by
document: whole source documents are resampled with replacement, each with all its scored
tokens (Corpus.token_batches packs several documents into a row and splits long ones across
rows; every token carries its document's id). Resampling rows instead treats the pieces of one
document as independent and leaves out the variation between documents, which dominates.
Pass 2 lives in saes/splice.py; the intervals in saeflow.intervals.

FVU alone can be fooled: in Gemma's residual stream a few "massive" dimensions carry most of
the variance, so an SAE that only reconstructs them scores well. `fvu_rest` leaves those
dimensions out (they are named in `massive_dims`: each carries at least 10% of the variance,
or 1000x the median dimension's).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from saeflow.errors import ConfigError, CorpusError
from saeflow.ids import Slot
from saeflow.intervals import (  # noqa: F401  (re-exported: eval's intervals live there)
    BOOTSTRAP_SAMPLES,
    bootstrap_ratio_ci,
    cluster_ratio_ci,
    cluster_sums,
)
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.model import LoadedModel, dtype_name, resolve_dtype, resolve_encoder_dtype
from saeflow.saes.packs import Pack, pack_fingerprint
from saeflow.saes.scan import PassJob, PassParts, ScanSpec, batch_budgets, scan, to_device
from saeflow.saes.splice import nll_and_kl, splice_ce  # noqa: F401  (nll_and_kl: re-exported)

DENSE_FRACTION = 0.10
KEEP_IN_MEMORY_BYTES = 4 << 30  # below this, all SAEs stay loaded for the whole evaluation
# A dimension is massive when it alone carries this share of the variance, or its variance is
# this many times the median dimension's. On the embedded model's residual stream that picks
# 2 / 10 / 2 / 1 dimensions at layers 0 / 3 / 6 / 9 (one carries 95% of the variance at layer 0).
MASSIVE_SHARE = 0.10
MASSIVE_FACTOR = 1000.0
CI_UNITS = ("document", "row")  # what the ΔCE / KL bootstrap resamples
DEAD_TOKENS = 50_000  # held-out tokens on which the dead and dense fractions are counted
STACK_ELEMENTS = 1 << 26  # inputs of SAEs whose reconstruction sums are stacked at once
# On a CPU stacking saves no launches, and stacks past glibc's 32 MB mmap ceiling come from
# fresh zeroed pages every batch (+1.2 s of page faults on the quick run's eval pass): at most
# this many elements, one SAE of the embedded model at a time.
CPU_STACK_ELEMENTS = 1 << 21


def massive_dims(var: torch.Tensor, share: float = MASSIVE_SHARE,
                 factor: float = MASSIVE_FACTOR) -> list[int]:
    """Indices of the dimensions (variance [d]) that carry at least `share` of the total
    variance, or whose variance is at least `factor` x the median dimension's."""
    total, med = float(var.sum()), float(var.median())
    if total <= 0:
        return []
    # a large share alone is no outlier in a small or flat space: it must stand out, too
    big = (var >= share * total) & (var >= 10 * med)
    if med > 0:
        big |= var >= factor * med
    return torch.nonzero(big).flatten().tolist()


def ci_method(unit: str, samples: int = BOOTSTRAP_SAMPLES) -> str:
    return f"bootstrap by {unit}, {samples} resamples"


@dataclass
class _Acc:
    sse: float = 0.0
    sum_sq: float = 0.0
    n: int = 0
    l0_sum: float = 0.0
    x_sum: torch.Tensor | None = None  # [d] float64
    sq_dim: torch.Tensor | None = None  # [d] float64: sum of x^2 per dimension
    sse_dim: torch.Tensor | None = None  # [d] float64: sum of squared error per dimension


class _Reconstruction:
    """FVU, L0 and per-dimension sums of every SAE, encoded and decoded in float32 from the
    SAEs' inputs (the pass's own codes may be bf16), on the batches of its token budget.

    A batch costs each SAE its encode, decode and three float32 sums, and no host sync: the
    sums stay on the device, stacked for the SAEs whose inputs have one width, whose
    per-dimension float64 sums are a few launches for all of them (issue 29). `acc` hands them
    out as an `_Acc` per SAE with the numbers of every saeflow version: the same float32 sums,
    added in float64 in the same order."""

    def __init__(self, plan: dict, k: int, device):
        self.plan, dev = plan, torch.device(device)
        self.groups: dict[int, list] = {}  # {d_in: the SAEs reading inputs of that width}
        for s in plan["slots"]:
            self.groups.setdefault(plan["d_in"][s], []).append(s)
        self.n = dict.fromkeys(plan["slots"], 0)
        self.seen = dict.fromkeys(plan["slots"], False)  # added a batch: the sums are tensors
        # [S, 3] sse, sum_sq, l0_sum, from +0.0 as the float sums were; [S, 3, d_in] x_sum,
        # sq_dim, sse_dim from -0.0, which adds as nothing (x + -0.0 is x, -0.0 included)
        self.scal = {d: torch.zeros(len(ss), 3, dtype=torch.float64, device=dev)
                     for d, ss in self.groups.items()}
        self.dims = {d: torch.full((len(ss), 3, d), -0.0, dtype=torch.float64, device=dev)
                     for d, ss in self.groups.items()}

    def on_batch(self, z, b, content, acts) -> None:
        found = content.reshape(-1).nonzero().squeeze(1)  # where content is (the host: no sync)
        rows: dict = {}  # ... and on each device
        with torch.inference_mode():
            for d, ss in self.groups.items():
                dev = acts[ss[0]].device
                if dev not in rows:
                    rows[dev] = to_device(found, dev)
                # SAEs in chunks: the float64 copy of a chunk's inputs stays <= 512 MB
                most = STACK_ELEMENTS if dev.type == "cuda" else min(STACK_ELEMENTS,
                                                                     CPU_STACK_ELEMENTS)
                step = max(1, most // max(1, len(found) * d))
                for a in range(0, len(ss), step):
                    self._add(d, a, ss[a:a + step], acts, rows[dev])
        for s in self.plan["slots"]:
            self.n[s] += len(found)
            self.seen[s] = True

    def _add(self, d: int, first: int, slots: list, acts: dict, rows: torch.Tensor) -> None:
        """One batch of the SAEs `slots`, from row `first` of the stacked sums of width d."""
        X = torch.empty(len(slots), len(rows), d, dtype=torch.float32, device=rows.device)
        E = torch.empty_like(X)  # [S, n, d_in] inputs and reconstruction errors
        f32, l0 = [], []
        for s, x, e in zip(slots, X.unbind(0), E.unbind(0)):
            if acts[s].dtype == x.dtype:
                torch.index_select(acts[s].reshape(-1, d), 0, rows, out=x)
            else:
                x.copy_(acts[s].reshape(-1, d).index_select(0, rows))
            sae = self.plan["sae_of"](s)
            code = sae.encode(x)  # [n, d_sae]
            err = torch.sub(sae.decode(code), x, out=e)
            # each SAE's own float32 sums: a stacked sum may add in another order
            f32 += [err.pow(2).sum(), x.pow(2).sum()]
            l0.append((code > 0).sum())
        b = slice(first, first + len(slots))
        scal, dims = self.scal[d], self.dims[d]
        scal[b, :2] += torch.stack(f32).view(-1, 2).to(scal.device)
        scal[b, 2] += torch.stack(l0).to(scal.device)
        # the float64 dimension sums, stacked: sum(1) of [S, n, d_in] adds in the order sum(0)
        # of each SAE's [n, d_in] did (one float64 buffer, squared in place)
        Xd = X.double()
        dims[b, 0] += Xd.sum(1).to(dims.device)
        dims[b, 1] += Xd.pow_(2).sum(1).to(dims.device)
        dims[b, 2] += Xd.copy_(E).pow_(2).sum(1).to(dims.device)

    @property
    def acc(self) -> dict:
        """{slot: _Acc} (tensors None before any batch)."""
        out = {}
        for d, ss in self.groups.items():
            scal = self.scal[d].cpu()
            for i, s in enumerate(ss):
                dims = [self.dims[d][i, j].clone() if self.seen[s] else None for j in range(3)]
                out[s] = _Acc(float(scal[i, 0]), float(scal[i, 1]), self.n[s],
                              float(scal[i, 2]), *dims)
        return out

    def state(self) -> dict:
        return {str(Slot.of(s)): {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                  for k, v in vars(a).items()}
                for s, a in self.acc.items()}

    def load(self, st: dict) -> None:
        for d, ss in self.groups.items():
            for i, s in enumerate(ss):
                a = _Acc(**st[str(Slot.of(s))])
                self.scal[d][i] = torch.tensor([a.sse, a.sum_sq, a.l0_sum], dtype=torch.float64)
                self.n[s], self.seen[s] = a.n, a.x_sum is not None
                for j, v in enumerate((a.x_sum, a.sq_dim, a.sse_dim)):
                    self.dims[d][i, j] = -0.0 if v is None else v

    def merge(self, other: "_Reconstruction") -> None:
        for d in self.groups:
            self.scal[d] += other.scal[d].to(self.scal[d].device)
            self.dims[d] += other.dims[d].to(self.dims[d].device)
        for s in self.n:
            self.n[s] += other.n[s]
            self.seen[s] |= other.seen[s]


class _Firing:
    """How many content tokens each latent fired on (the pass's codes), for the dead and dense
    fractions, on the batches of its token budget. A batch costs each SAE three launches and
    no host sync; the counts of the SAEs of one width are one [S, d] tensor (each SAE's `fire`
    a view of it), added to once."""

    def __init__(self, plan: dict, k: int, device):
        self.groups: dict[int, list] = {}  # {d_sae: the SAEs of that width}
        for s in plan["slots"]:
            self.groups.setdefault(plan["d"][s], []).append(s)
        self.counts = {d: torch.zeros(len(ss), d, dtype=torch.long, device=device)
                       for d, ss in self.groups.items()}
        self.fire = {s: self.counts[d][i] for d, ss in self.groups.items()
                     for i, s in enumerate(ss)}

    def on_batch(self, z, b, content, acts=None) -> None:
        rows: dict = {}  # the content rows on each device (found on the host: no sync)
        for d, ss in self.groups.items():
            counts = []
            for s in ss:
                dev = z[s].device
                if dev not in rows:
                    rows[dev] = to_device(content.reshape(-1).nonzero().squeeze(1), dev)
                counts.append((z[s].reshape(-1, d).index_select(0, rows[dev]) > 0).sum(0))
            self.counts[d] += torch.stack(counts).to(self.counts[d].device)

    def state(self) -> dict:
        return {str(Slot.of(s)): v.to("cpu", copy=True) for s, v in self.fire.items()}

    def load(self, st: dict) -> None:
        for s, v in self.fire.items():  # into the stacked counts, whose views these are
            v.copy_(st[str(Slot.of(s))])

    def merge(self, other: "_Firing") -> None:
        for d, v in self.counts.items():
            v += other.counts[d].to(v.device)


def eval_job(pack: Pack, model: LoadedModel, tokens: int = 8192,
             dead_tokens: int = DEAD_TOKENS, corpus: str = DEFAULT_SPEC, seed: int = 0,
             batch: int = 8, ctx_len: int = 128, encoder_dtype: str = "auto", *,
             state_file: Path) -> PassJob:
    """Eval's share of a corpus pass over held-out text: reconstruction on the first `tokens`
    tokens, firing counts on `dead_tokens` (at least `tokens`). Its `finish` gives the
    per-SAE measures without ΔCE/KL (`splice_ce` adds those)."""
    pack.check_model(model)
    slots = sorted(pack.entries)
    dev = model.device
    total = sum(2 * pack.entries[s].d_in * pack.entries[s].d_sae * 4 for s in slots)
    # Loading every SAE once beats re-reading them from disk for every batch.
    saes = {s: pack.sae(*s, device=dev, dtype=torch.float32) for s in slots} \
        if total <= KEEP_IN_MEMORY_BYTES else None

    def sae_of(s):
        return saes[s] if saes is not None else pack.sae(*s, device=dev, dtype=torch.float32)

    dead_tokens = max(tokens, dead_tokens)
    # the budgets are caps: on a short held-out split eval reads what there is
    spec = ScanSpec(tokens=dead_tokens, corpus=corpus, seed=seed, batch_size=batch,
                    ctx_len=ctx_len, encoder_dtype=encoder_dtype, checkpoint_every_s=120.0,
                    split="heldout", require_tokens=False)
    plan = {"slots": slots, "sae_of": sae_of, "d": {s: pack.entries[s].d_sae for s in slots},
            "d_in": {s: pack.entries[s].d_in for s in slots}}
    parts = {"reconstruction": (partial(_Reconstruction, plan), tokens),
             "firing": (partial(_Firing, plan), dead_tokens)}
    identity = {"pack": pack_fingerprint(pack), "model": model.name,
                "config": {"tokens": tokens, "dead_tokens": dead_tokens, "corpus": corpus,
                           "seed": seed, "batch": batch, "ctx_len": ctx_len,
                           "encoder_dtype": encoder_dtype},
                "encoder_dtype": dtype_name(resolve_encoder_dtype(encoder_dtype, dev))}

    def finish(total: PassParts, seconds: float, saes=None) -> dict:
        return eval_rows(pack, total.parts["reconstruction"].acc, total.parts["firing"].fire,
                         total.tokens["firing"])

    return PassJob("eval", identity, slots, spec, parts, finish, state_file, CorpusError)


def eval_rows(pack: Pack, acc: dict, fire: dict, seen: int) -> dict:
    """{"rows": per-SAE measures (ΔCE/KL None), "tokens", "dead_tokens"} from the sums."""
    if seen == 0:
        raise CorpusError("the held-out split gave no tokens")
    rows = []
    for s in sorted(pack.entries):
        a = acc[s]
        assert a.x_sum is not None and a.sq_dim is not None and a.sse_dim is not None
        var = a.sum_sq - float(a.x_sum.pow(2).sum()) / a.n
        var_dim = (a.sq_dim - a.x_sum.pow(2) / a.n).cpu()  # [d]
        massive = massive_dims(var_dim)
        rest = torch.ones(len(var_dim), dtype=torch.bool)
        rest[massive] = False
        fvu_rest = float(a.sse_dim.cpu()[rest].sum() / var_dim[rest].sum().clamp_min(1e-12))
        freq = fire[s].float().cpu() / seen
        info = pack.entries[s]
        rows.append({
            "position": s[0], "layer": s[1], "d_sae": info.d_sae,
            "architecture": info.architecture,
            "fvu": a.sse / max(var, 1e-12),
            "fvu_rest": fvu_rest,
            "massive_dims": massive,
            "l0": a.l0_sum / a.n,
            "dead_fraction": float((fire[s] == 0).float().mean()),
            "dense_fraction": float((freq > DENSE_FRACTION).float().mean()),
            "delta_ce": None, "delta_ce_ci": None, "kl": None, "kl_ci": None,
            "tokens": a.n,
            "dead_tokens": seen,
        })
    return {"rows": rows, "tokens": acc[sorted(pack.entries)[0]].n, "dead_tokens": seen}


def evaluate_pack(pack: Pack, model: LoadedModel, tokens: int = 8192, ce_tokens: int = 1024,
                  corpus: str = DEFAULT_SPEC, seed: int = 0, batch: int = 8,
                  ctx_len: int = 128, progress: bool = True,
                  dead_tokens: int = DEAD_TOKENS, ce_positions: list[str] | None = None,
                  ci_by: str = "document", encoder_dtype: str = "auto") -> dict:
    """Return {"saes": [row per SAE], "clean_ce": float, ...} on the held-out split.

    FVU / L0 on `tokens` held-out tokens (float32 SAEs); dead and dense fractions on
    max(tokens, dead_tokens), from codes in `encoder_dtype` (the index's and the statistics'
    dtype: `saeflow run` reads the text once for all three); ΔCE / KL on `ce_tokens`, splicing
    the SAEs at `ce_positions` (default: all; every spliced SAE costs a full forward with the LM
    head per token, so this is the expensive part). SAEs at other positions get None for ΔCE
    and KL. Their 95% intervals resample whole documents (ci_by "document"; "row" resamples the
    fixed-length text rows, which understates the spread); ce_documents, ce_tokens and
    ce_ci_method record what they rest on."""
    import tempfile

    check_ce_request(pack, ce_positions, ci_by)
    with tempfile.TemporaryDirectory(prefix="saeflow-eval-") as tmp:
        job = eval_job(pack, model, tokens, dead_tokens, corpus, seed, batch, ctx_len,
                       encoder_dtype, state_file=Path(tmp) / "state.pt")
        # one shard (this process): the same sums as the shards of `saeflow run`'s pass
        budgets = batch_budgets(model.tokenizer, job.spec,
                                {n: t for n, (_, t) in job.parts.items()}, CorpusError,
                                caps=set(job.parts))
        acc = PassParts({n: (make, budgets[n]) for n, (make, _) in job.parts.items()},
                        1 << 40, 0, model.device)
        res = scan(model, pack, job.slots, job.spec, job.state_file, job.identity,
                   acc.on_batch, acc.state, acc.load, progress=progress,
                   desc="eval: reconstruction + firing", codes_on_device=True,
                   error=CorpusError)
    measures = job.finish(acc, res["seconds"])
    return with_splice(pack, model, measures, ce_tokens=ce_tokens, corpus=corpus, seed=seed,
                       batch=batch, ctx_len=ctx_len, progress=progress,
                       ce_positions=ce_positions, ci_by=ci_by, encoder_dtype=encoder_dtype)


def check_ce_request(pack: Pack, ce_positions: list[str] | None, ci_by: str) -> None:
    """Refuse a bad ΔCE request before any pass over the text."""
    if ci_by not in CI_UNITS:
        raise ConfigError(f"ci_by must be one of {', '.join(CI_UNITS)}, got {ci_by!r}")
    have = sorted({s[0] for s in pack.entries})
    missing = sorted(set(ce_positions or []) - set(have))
    if missing:
        raise ConfigError(f"no SAE of the pack is at --ce-positions {', '.join(missing)}; the "
                          f"pack has {', '.join(have)}")


def with_splice(pack: Pack, model: LoadedModel, measures: dict, *, ce_tokens: int, corpus: str,
                seed: int, batch: int, ctx_len: int, progress: bool,
                ce_positions: list[str] | None, ci_by: str, encoder_dtype: str) -> dict:
    """eval.json: the pass's measures (`eval_job`) with ΔCE / KL of the spliced SAEs."""
    ce_positions = ce_positions or None  # empty: all
    slots = sorted(pack.entries)
    dev = model.device

    def sae_of(s):
        return pack.sae(*s, device=dev, dtype=torch.float32)

    spliced = [s for s in slots if ce_positions is None or s[0] in ce_positions]
    data = Corpus.from_spec(corpus, seed=seed)
    ce = splice_ce(pack, model, spliced, sae_of, data, ce_tokens, batch, ctx_len, progress,
                   ci_by)
    rows = []
    for r in measures["rows"]:
        pc = ce["per_sae"].get((r["position"], r["layer"]))
        rows.append({**r, **({} if pc is None else {
            "delta_ce": pc["ce"] - ce["clean_ce"], "delta_ce_ci": pc["delta_ce_ci"],
            "kl": pc["kl"], "kl_ci": pc["kl_ci"]})})
    return {"pack": str(pack.root), "model": model.name, "tokens": measures["tokens"],
            "dead_tokens": measures["dead_tokens"], "firing_dtype": str(resolve_dtype(
                encoder_dtype, dev)).removeprefix("torch."),
            "ce_tokens": ce["tokens"], "ce_documents": ce["documents"], "ce_rows": ce["rows"],
            "ce_ci_method": ci_method(ci_by), "ce_positions": ce_positions,
            "clean_ce": ce["clean_ce"], "saes": rows}


def format_table(result: dict) -> str:
    dead_n = result.get("dead_tokens", result["tokens"])
    docs = result.get("ce_documents")
    method = result.get("ce_ci_method", "bootstrap by text row")  # earlier eval.json: by row
    lines = [f"pack {result['pack']} on {result['model']}: FVU/L0 on {result['tokens']} held-out "
             f"tokens, dead/dense on {dead_n}; ΔCE/KL on {result['ce_tokens']}"
             f"{'' if docs is None else f' tokens of {docs} documents'} (95% intervals, "
             f"{method}); clean CE {result['clean_ce']:.4f}",
             f"{'position':<11}{'layer':>5} {'d_sae':>7} {'FVU':>7} {'FVUrest':>7} {'L0':>7} "
             f"{'dead':>6} {'dense':>6} {'ΔCE [95% CI]':>26} {'KL':>8}  massive dims"]
    nan = float("nan")
    for r in result["saes"]:
        lo, hi = r.get("delta_ce_ci") or (nan, nan)
        r = {**r, "delta_ce": nan if r["delta_ce"] is None else r["delta_ce"],
             "kl": nan if r["kl"] is None else r["kl"]}
        lines.append(f"{r['position']:<11}{r['layer']:>5} {r['d_sae']:>7} {r['fvu']:>7.3f} "
                     f"{r.get('fvu_rest', float('nan')):>7.3f} {r['l0']:>7.1f} "
                     f"{r['dead_fraction']:>6.3f} {r['dense_fraction']:>6.3f} "
                     f"{r['delta_ce']:>8.4f} [{lo:>7.4f}, {hi:>7.4f}] {r['kl']:>8.4f}  "
                     f"{','.join(map(str, r.get('massive_dims', []))) or '-'}")
    return "\n".join(lines)
