"""Train a whole SAE family (layers x positions) from one pass of the model over a corpus.

Per forward batch, the activations of every (position, layer) are captured once and appended to
per-SAE chunk buffers. When a chunk is full (chunk_tokens), each SAE shuffles its buffer and
trains on it in batches; then the buffers are empty, which is where checkpoints are taken. So a
resumed run replays exactly the same batches: the corpus is deterministic and skipped chunks
only need tokenising, not a forward pass.

The SAE recipe (TopK / BatchTopK, after Gao et al. 2024 and Bussmann et al. 2024):
  - inputs standardised per dimension (input_norm "dim"): each dimension divided by its standard
    deviation on the first chunk, capped at dim_cap x the median one (Gemma's massive residual
    dimensions); folded exactly into W_enc, W_dec and b_dec on export, and recorded (not to be
    applied again) as metadata.saeflow.dim_scale in cfg.json. input_norm "scalar" is the older
    single factor with E||x||^2 = d_in (recorded as input_scale, folded on save);
  - b_dec initialised at the geometric median of the first chunk;
  - W_dec rows kept at unit norm (gradient parallel to each row removed, then renormalised);
  - AuxK loss: the top-k_aux pre-activations among dead latents reconstruct the residual;
  - BatchTopK exports a JumpReLU threshold: the mean of the smallest selected value over the
    last steps (the lr decay).

Speed: the encoder runs in bf16 when that is faster (CPU with avx512_bf16, or a GPU); only the
selected pre-activations carry gradient, so the encoder's backward is a sparse product
(CSR, nnz = batch * k) instead of a dense batch x d_sae one; decoding is an embedding_bag
(a gather of k rows) rather than a dense matmul. AuxK runs dense on the block of dead latents
(a few % of the width), and the encoder is held transposed, so its gradient needs no copy.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from saeflow._version import __version__
from saeflow.checks import flag
from saeflow.errors import ConfigError, TrainingError
from saeflow.lm.corpora import Corpus
from saeflow.lm.hooks import HookPoint, capture
from saeflow.lm.model import LoadedModel, dtype_name, resolve_encoder_dtype
from saeflow.saes.packs import PACK_MANIFEST, Pack, load_pack, save_pack
from saeflow.saes.sae import SAE
from saeflow.saes.train.config import TrainConfig

CKPT_FILE = "state.pt"
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


def _dim_scale(x: torch.Tensor, cap: float = 0.0) -> torch.Tensor:
    """Per-dimension input scale [d] of x [N, d] (float32).

    1 / standard deviation, with the sd floored at 1% of the median one (no blow-up of empty
    dimensions) and, for cap c > 0, capped at c x the median one."""
    sd = x.float().std(0)
    med = float(sd.median()) + 1e-12
    return 1.0 / sd.clamp(min=med * 1e-2, max=med * cap if cap > 0 else float("inf"))


def _fold_dim_scale(W_enc, W_dec, b_dec, v):
    """Exact fold of a per-dimension input scale v [d]: the SAE that encodes v*x and decodes
    back with /v equals one on raw x with W_enc' = diag(v) W_enc, W_dec' = W_dec diag(1/v),
    b_dec' = b_dec / v (b_dec is subtracted from the input and added to the output)."""
    return v[:, None] * W_enc, W_dec / v[None, :], b_dec / v


DIM_SCALE_NOTE = ("training inputs were x * dim_scale per dimension (1 / min(sd, dim_cap x the "
                  "median sd), sd on the first chunk); already folded exactly into W_enc, W_dec "
                  "and b_dec: informational, do not apply it again")


def _dim_scale_metadata(v: torch.Tensor, cap: float) -> dict:
    """What an export records of its per-dimension scale v [d] (written to cfg.json under
    metadata.saeflow; loaders ignore it). Each float is the shortest decimal that reads back
    as the same float32."""
    return {"input_norm": "dim (folded)", "dim_cap": cap,
            "dim_scale": [float(str(x)) for x in v.float().cpu().numpy()],
            "dim_scale_note": DIM_SCALE_NOTE}


# --- sparse encoder -----------------------------------------------------------------------------
class _GatherPre(torch.autograd.Function):
    """vals[j] = ((x - b_dec)[rows[j]] @ W_enc[:, cols[j]]) + b_enc[cols[j]] for given (rows, cols).

    Forward takes the dense pre-activations computed without grad; backward is sparse, with
    G [batch, d_sae] the gradient at the selected entries (CSR, nnz = len(vals)):
      grad W_enc = xc^T @ G, grad b_enc = column sums of G, grad b_dec = -W_enc @ colsum(G).
    (x is data, so the per-row input gradient is never formed.)
    """

    @staticmethod
    def forward(ctx, pre_vals, xc, W_enc, b_enc, b_dec, cols, crow):
        ctx.save_for_backward(xc, W_enc, cols, crow)
        return pre_vals

    @staticmethod
    def backward(ctx, grad_vals):
        xc, W_enc, cols, crow = ctx.saved_tensors
        B, n = xc.shape[0], W_enc.shape[1]
        G = torch.sparse_csr_tensor(crow, cols, grad_vals, (B, n))
        grad_W = (G.t() @ xc).t()  # [d_in, d_sae]
        grad_b = torch.zeros(n, dtype=grad_vals.dtype, device=grad_vals.device).index_add_(
            0, cols, grad_vals)
        grad_b_dec = -(W_enc @ grad_b)
        return None, None, grad_W, grad_b, grad_b_dec, None, None


class _BlockPre(torch.autograd.Function):
    """vals [B, m] = (x - b_dec) @ W_blk^T + b_blk for a block of m latents, given their encoder
    rows W_blk [m, d_in] and biases b_blk [m] (leaves of their own).

    Forward takes the values computed without grad (from the step's encoder product); backward
    is dense on the block: grad W_blk = G^T xc, grad b_blk = column sums of G, grad b_dec =
    -(column sums of G) @ W_blk, with G [B, m] the gradient at vals."""

    @staticmethod
    def forward(ctx, vals, xc, W_blk, b_blk, b_dec):
        ctx.save_for_backward(xc, W_blk)
        return vals

    @staticmethod
    def backward(ctx, grad_vals):
        xc, W_blk = ctx.saved_tensors
        col_sums = grad_vals.sum(0)  # [m]
        return None, None, grad_vals.t() @ xc, col_sums, -(col_sums @ W_blk)


def _csr_rows(rows: torch.Tensor, B: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=B)
    crow = torch.zeros(B + 1, dtype=torch.long, device=rows.device)
    crow[1:] = counts.cumsum(0)
    return crow


def _init_decoder(n: int, d_in: int, seed: int) -> torch.Tensor:
    """Unit-norm random decoder rows [n, d_in], the same for a seed on any device or engine."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, d_in, generator=g)
    return W_dec / W_dec.norm(dim=1, keepdim=True)


def _threshold_from(cfg: TrainConfig, steps_total: int) -> int:
    """First step whose BatchTopK threshold counts towards the exported one: the last
    decay_frac (at least 10%) of the steps, where the parameters have settled. Averaging over
    the whole run left the threshold at early, larger values: ~3 active latents per token
    instead of k = 4 on held-out data in the tests."""
    return min(steps_total - 1, int(steps_total * (1 - max(cfg.decay_frac, 0.1))))


def _decay_start(cfg: TrainConfig, steps_total: int) -> int:
    """First step of the linear lr decay."""
    return steps_total - int(cfg.decay_frac * steps_total)


@torch.no_grad()
def _reset_latents(dead, d, W_enc, W_dec, b_enc, moments) -> None:
    """Latents `dead` [n] (bool) take unit decoder rows along d [n_dead, d_in], encoder columns
    0.2 x the mean live column norm along the same direction, bias 0 and fresh Adam moments.
    moments: {"W_enc" | "W_dec" | "b_enc": Adam's state tensors shaped like that parameter}
    (views, zeroed in place)."""
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    live = ~dead
    norm = W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
    W_dec[dead] = d
    W_enc[:, dead] = d.t() * 0.2 * norm
    b_enc[dead] = 0.0
    for name, sl in (("W_dec", (dead,)), ("W_enc", (slice(None), dead)), ("b_enc", (dead,))):
        for v in moments[name]:
            v[sl] = 0.0


def _moments(trainer, i: int | None = None) -> dict:
    """Adam's state tensors of W_enc, W_dec and b_enc (of SAE i of a stacked trainer), as views
    shaped like that parameter (W_enc [d_in, n] also where SAETrainer holds its transpose)."""
    out = {}
    for name in ("W_enc", "W_dec", "b_enc"):
        flip = name == "W_enc" and hasattr(trainer, "W_enc_t")
        p = trainer.W_enc_t if flip else getattr(trainer, name)
        out[name] = [(v.t() if flip else v) if i is None else v[i]
                     for v in trainer.opt.state.get(p, {}).values()
                     if torch.is_tensor(v) and v.shape == p.shape]
    return out


def _flip(v):
    """A contiguous transposed copy of a 2-D tensor; anything else as it is."""
    return v.t().contiguous() if torch.is_tensor(v) and v.dim() == 2 else v


def _lr_at(cfg: TrainConfig, steps_total: int, step: int) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last decay_frac of the steps."""
    T = steps_total
    warm, decay = max(1, int(cfg.warmup_frac * T)), int(cfg.decay_frac * T)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if decay and step >= T - decay:
        return cfg.lr * max(0.0, (T - step) / decay)
    return cfg.lr


class SAETrainer:
    """Parameters, optimiser and counters of one SAE in training."""

    def __init__(self, d_in: int, cfg: TrainConfig, steps_total: int, device, seed: int,
                 enc_dtype: torch.dtype):
        self.cfg, self.d_in, self.n = cfg, d_in, cfg.width
        self.steps_total, self.enc_dtype = steps_total, enc_dtype
        self.seed = seed
        W_dec = _init_decoder(self.n, d_in, seed)
        # The encoder is held as its transpose W_enc_t [n, d_in] (tied init: W_dec itself). The
        # sparse backward forms grad W_enc^T = G^T xc, which then lands in .grad as it is: with
        # a [d_in, n] parameter, autograd made a transposing copy of it every step (~5 ms of a
        # ~33 ms step). `W_enc` [d_in, n] is a view of it.
        self.W_enc_t = W_dec.clone().to(device).requires_grad_()
        self.W_dec = W_dec.clone().to(device).requires_grad_()
        self.b_enc = torch.zeros(self.n, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d_in, device=device, requires_grad=True)
        self.params = [self.W_enc_t, self.W_dec, self.b_enc, self.b_dec]
        fused = device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        self.input_scale: float | None = None
        self.dim_scale: torch.Tensor | None = None  # [d_in] with input_norm "dim"
        self.step_i = 0
        self.since_fired = torch.zeros(self.n, dtype=torch.long, device=device)
        self.fired_ever = torch.zeros(self.n, dtype=torch.bool, device=device)
        self.thr_sum, self.thr_count = 0.0, 0  # BatchTopK threshold estimate
        self.aux_k = cfg.aux_k or max(1, d_in // 2)
        self.dead_tokens = cfg.dead_tokens or max(cfg.batch_size * 4, cfg.tokens // 10)
        self.last: dict = {}

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder [d_in, n], a view of W_enc_t."""
        return self.W_enc_t.t()

    # --- initialisation from data -------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """x [N, d_in] (first chunk): fix the input scale and start b_dec at the geometric median."""
        x = x.float()
        if self.cfg.input_norm == "dim":
            self.input_scale = 1.0
            self.dim_scale = _dim_scale(x, self.cfg.dim_cap)
            xs = x * self.dim_scale
        else:
            self.input_scale = float(math.sqrt(self.d_in / x.pow(2).sum(1).mean().clamp_min(1e-12)))
            xs = x * self.input_scale
        med = xs.mean(0)
        for _ in range(30):  # Weiszfeld iterations
            w = 1.0 / (xs - med).norm(dim=1).clamp_min(1e-6)
            med = (w[:, None] * xs).sum(0) / w.sum()
        self.b_dec.copy_(med)

    def lr_at(self, step: int) -> float:
        return _lr_at(self.cfg, self.steps_total, step)

    # --- one step -------------------------------------------------------------------------------
    def _select(self, pre: torch.Tensor):
        """Indices of the active latents: TopK per row, or BatchTopK over the batch."""
        B = pre.shape[0]
        k = self.cfg.k
        if self.cfg.architecture == "topk":
            vals, cols = pre.topk(k, dim=1)
            rows = torch.arange(B, device=pre.device).repeat_interleave(k)
            cols = cols.reshape(-1)
            keep = vals.reshape(-1) > 0
            rows, cols = rows[keep], cols[keep]
        else:
            flat = pre.reshape(-1)
            vals, pos = flat.topk(B * k)
            keep = vals > 0
            pos = pos[keep].sort().values  # row-major order for CSR
            rows, cols = pos // self.n, pos % self.n
            if keep.any() and self.step_i >= _threshold_from(self.cfg, self.steps_total):
                self.thr_sum += float(vals[keep].min().float())
                self.thr_count += 1
        return rows, cols

    def step(self, x: torch.Tensor) -> dict:
        """x [B, d_in] raw activations -> metrics; updates the parameters."""
        cfg = self.cfg
        B = x.shape[0]
        assert self.input_scale is not None  # fixed by the first batch
        x = x.float() * self.input_scale
        if self.dim_scale is not None:
            x = x * self.dim_scale
        with torch.no_grad():
            xc = x - self.b_dec
            dt = self.enc_dtype  # pre [B, d_sae] stays in this dtype; only selected values go fp32
            pre = torch.addmm(self.b_enc.to(dt), xc.to(dt), self.W_enc.to(dt))
            rows, cols = self._select(pre)
            crow = _csr_rows(rows, B)
        vals = _GatherPre.apply(pre[rows, cols].float(), xc, self.W_enc, self.b_enc, self.b_dec, cols,
                                crow)
        acts = torch.relu(vals)
        recon = F.embedding_bag(cols, self.W_dec, crow[:-1], mode="sum",
                                per_sample_weights=acts) + self.b_dec
        err = recon - x
        mse = err.pow(2).sum() / B
        loss = mse
        # AuxK: dead latents try to explain the residual error.
        with torch.no_grad():
            dead = self.since_fired > self.dead_tokens
            n_dead = int(dead.sum())
        aux = torch.zeros((), device=x.device)
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        if n_dead > 0:
            ka = min(self.aux_k, n_dead)
            with torch.no_grad():
                dead_cols = dead.nonzero().squeeze(1)  # [n_dead]
                ablock = pre[:, dead_cols].float()  # [B, n_dead]
                if ka < n_dead:  # only the top ka dead latents of each row take part
                    keep = torch.zeros_like(ablock).scatter_(1, ablock.topk(ka, dim=1).indices, 1.0)
            # Dense on the dead block: the dead latents are few (a few % of the width), and one
            # GEMM beats a sparse product over B x n_dead selections (~2x a step with 30 dead).
            # The block's rows are leaves of their own, added into the full gradients after
            # backward, so no full-size zero gradient is built for them.
            blocks = [(P[dead_cols].detach().requires_grad_(), P)
                      for P in (self.W_enc_t, self.b_enc, self.W_dec)]
            (We, _), (be, _), (Wd, _) = blocks
            avals = _BlockPre.apply(ablock, xc, We, be, self.b_dec)  # [B, n_dead]
            if ka < n_dead:
                avals = avals * keep
            if cfg.aux_activation == "relu":
                avals = torch.relu(avals)
            arecon = avals @ Wd  # [B, d_in]
            resid = (x - recon).detach()
            # Same units as the main loss (squared error per token), as in Gao et al.
            aux = (arecon - resid).pow(2).sum() / B
            loss = loss + cfg.aux_coef * aux
        for p in self.params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for blk, P in blocks:  # the AuxK block's gradients, into the full ones
                if blk.grad is not None:
                    assert P.grad is not None  # the main loss reaches every parameter
                    P.grad.index_add_(0, dead_cols, blk.grad)
            # Keep decoder rows on the unit sphere: drop the radial part of their gradient.
            g = self.W_dec.grad
            assert g is not None
            g.addcmul_(torch.linalg.vecdot(g, self.W_dec)[:, None], self.W_dec, value=-1)
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step_i)
            self.opt.step()
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fired = torch.zeros(self.n, dtype=torch.bool, device=x.device)
            fired[cols] = True
            self.since_fired += B
            self.since_fired[fired] = 0
            self.fired_ever |= fired
            var = (x - x.mean(0)).pow(2).sum()
            self.last = {"fvu": float(err.pow(2).sum() / var.clamp_min(1e-12)),
                         "l0": cols.numel() / B, "dead": n_dead / self.n,
                         "loss": float(loss), "aux": float(aux)}
        self.step_i += 1
        if not math.isfinite(self.last["loss"]) or self.last["fvu"] > 1e3:
            raise TrainingError(f"loss is {self.last['loss']} (FVU {self.last['fvu']:.3g})")
        return self.last

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """x [N, d_in] raw chunk: re-initialise the dead latents (cfg.resample_dead) before the
        lr decay; returns how many. Each takes the centred direction of an input drawn with
        probability proportional to its squared reconstruction error (Anthropic, "Towards
        monosemanticity", 2023)."""
        if not self.cfg.resample_dead or self.step_i >= _decay_start(self.cfg, self.steps_total):
            return 0
        dead = self.since_fired > self.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        assert self.input_scale is not None  # fixed by the first chunk
        xs = x.float() * self.input_scale
        if self.dim_scale is not None:
            xs = xs * self.dim_scale
        err = torch.cat([(self._reconstruct(xb) - xb).pow(2).sum(1)
                         for xb in xs.split(self.cfg.batch_size)])  # [N]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_i)  # exact on resume
        idx = torch.multinomial(err.cpu().double() + 1e-12, n_dead, replacement=n_dead > len(err),
                                generator=gen).to(xs.device)
        _reset_latents(dead, xs[idx] - self.b_dec, self.W_enc, self.W_dec, self.b_enc,
                       _moments(self))
        self.since_fired[dead] = 0
        return n_dead

    def _reconstruct(self, xs: torch.Tensor) -> torch.Tensor:
        """xs [B, d_in] scaled inputs -> reconstruction [B, d_in], with the training activation."""
        pre = torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc)
        rows, cols = self._select_quiet(pre)
        acts = torch.relu(pre[rows, cols])
        return F.embedding_bag(cols, self.W_dec, _csr_rows(rows, xs.shape[0])[:-1], mode="sum",
                               per_sample_weights=acts) + self.b_dec

    def _select_quiet(self, pre: torch.Tensor):
        """_select without the BatchTopK threshold bookkeeping."""
        saved = self.thr_sum, self.thr_count
        try:
            return self._select(pre)
        finally:
            self.thr_sum, self.thr_count = saved

    # --- export / state ---------------------------------------------------------------------------
    def export(self, metadata: dict) -> SAE:
        cfg = self.cfg
        W_enc = self.W_enc.detach().float().cpu()
        W_dec = self.W_dec.detach().float().cpu()
        b_dec = self.b_dec.detach().float().cpu()
        if self.dim_scale is not None:
            v = self.dim_scale.float().cpu()
            W_enc, W_dec, b_dec = _fold_dim_scale(W_enc, W_dec, b_dec, v)
            metadata = {**metadata, **_dim_scale_metadata(v, cfg.dim_cap)}
        threshold = None
        if cfg.architecture == "batchtopk":
            theta = self.thr_sum / max(1, self.thr_count)
            threshold = torch.full((self.n,), theta)
        assert self.input_scale is not None  # fixed by the first batch
        return SAE(W_enc=W_enc.contiguous(), W_dec=W_dec,
                   b_enc=self.b_enc.detach().float().cpu(), b_dec=b_dec,
                   architecture=cfg.architecture, threshold=threshold, k=cfg.k,
                   apply_b_dec_to_input=True, input_scale=self.input_scale,
                   batchtopk_inference="jumprelu", metadata=metadata)

    def state_dict(self) -> dict:
        """A checkpoint with W_enc and its Adam moments as [d_in, n], the layout StackedTrainer
        and earlier versions use, so either engine resumes either's checkpoints."""
        opt = self.opt.state_dict()
        opt["state"] = {j: {k: _flip(v) if j == 0 else v for k, v in st.items()}
                        for j, st in opt["state"].items()}
        return {"params": [_flip(p.detach()) if j == 0 else p.detach().clone()
                           for j, p in enumerate(self.params)], "opt": opt,
                "input_scale": self.input_scale, "dim_scale": self.dim_scale, "step_i": self.step_i,
                "since_fired": self.since_fired.clone(), "fired_ever": self.fired_ever.clone(),
                "thr": (self.thr_sum, self.thr_count), "last": self.last}

    def load_state_dict(self, s: dict) -> None:
        with torch.no_grad():
            for j, (p, v) in enumerate(zip(self.params, s["params"])):
                p.copy_(v.t() if j == 0 else v)
        opt = dict(s["opt"])
        opt["state"] = {j: {k: _flip(v) if j == 0 else v for k, v in st.items()}
                        for j, st in opt["state"].items()}
        self.opt.load_state_dict(opt)
        self.input_scale, self.step_i = s["input_scale"], s["step_i"]
        ds = s.get("dim_scale")
        self.dim_scale = None if ds is None else ds.to(self.W_enc.device)
        self.since_fired.copy_(s["since_fired"])
        self.fired_ever.copy_(s["fired_ever"])
        self.thr_sum, self.thr_count = s["thr"]
        self.last = s["last"]


class StackedTrainer:
    """S SAEs of one input width trained as one batched problem, for GPUs.

    The same recipe as SAETrainer, step for step (same init per seed, same losses, same Adam),
    but dense and batched: pre-activations [S, B, n] from one bmm, TopK / BatchTopK as a scatter
    into a dense code, decoding as a second bmm, gradients from autograd. Nothing in a step waits
    for the host: dead-latent bookkeeping, AuxK and the metrics stay on the device, and metrics
    are read once per chunk (`metrics()`). In fp32 it equals SAETrainer to rounding; with a bf16
    `enc_dtype` both products run in bf16 (parameters, Adam and losses stay fp32).
    """

    engine = "stacked"

    def __init__(self, d_in: int, cfg: TrainConfig, steps_total: int, device, seeds: list[int],
                 enc_dtype: torch.dtype):
        self.cfg, self.d_in, self.n, self.S = cfg, d_in, cfg.width, len(seeds)
        self.steps_total, self.enc_dtype, self.seeds = steps_total, enc_dtype, list(seeds)
        W_dec = torch.stack([_init_decoder(self.n, d_in, s) for s in seeds])  # [S, n, d_in]
        self.W_enc = W_dec.transpose(1, 2).contiguous().to(device).requires_grad_()  # [S, d_in, n]
        self.W_dec = W_dec.to(device).requires_grad_()
        self.b_enc = torch.zeros(self.S, self.n, device=device, requires_grad=True)
        self.b_dec = torch.zeros(self.S, d_in, device=device, requires_grad=True)
        self.params = [self.W_enc, self.W_dec, self.b_enc, self.b_dec]
        fused = torch.device(device).type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        self.scale: torch.Tensor | None = None  # [S] input scale, fixed by the first chunk
        self.dim: torch.Tensor | None = None  # [S, d_in] per-dimension scales (input_norm "dim")
        self.step_i = 0
        self.since_fired = torch.zeros(self.S, self.n, dtype=torch.long, device=device)
        self.fired_ever = torch.zeros(self.S, self.n, dtype=torch.bool, device=device)
        self.thr_sum = torch.zeros(self.S, dtype=torch.float64, device=device)
        self.thr_count = torch.zeros(self.S, dtype=torch.long, device=device)
        self.aux_k = cfg.aux_k or max(1, d_in // 2)
        self.dead_tokens = cfg.dead_tokens or max(cfg.batch_size * 4, cfg.tokens // 10)
        self._last: dict[str, torch.Tensor] = {}  # metric -> [S], on the device

    @property
    def input_scale(self):
        return None if self.scale is None else self.scale

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """x [S, N, d_in] (first chunk): input scales and b_dec at the geometric medians."""
        x = x.float()
        # Python floats, as SAETrainer keeps them, so both engines scale inputs identically.
        if self.cfg.input_norm == "dim":
            self.scales = [1.0] * self.S
            self.dim = torch.stack([_dim_scale(xi, self.cfg.dim_cap) for xi in x])
        else:
            self.scales = [math.sqrt(self.d_in / float(m))
                           for m in x.pow(2).sum(2).mean(1).clamp_min(1e-12)]
        self.scale = torch.tensor(self.scales, device=x.device)  # [S]
        xs = x * self.scale[:, None, None]
        if self.dim is not None:
            xs = xs * self.dim[:, None, :]
        med = xs.mean(1)  # [S, d_in]
        for _ in range(30):  # Weiszfeld iterations
            w = 1.0 / (xs - med[:, None]).norm(dim=2).clamp_min(1e-6)  # [S, N]
            med = (w[:, :, None] * xs).sum(1) / w.sum(1, keepdim=True)
        self.b_dec.copy_(med)

    def _code(self, pre: torch.Tensor, k: int, batch_level: bool, linear: bool = False):
        """Dense code [S, B, n] of the top-k pre-activations (per row, or per batch); relu'd,
        or with their sign (`linear`; -inf, a masked entry, counts as 0)."""
        S, B, n = pre.shape
        if batch_level:
            vals, pos = pre.reshape(S, B * n).topk(B * k, dim=1)  # [S, B*k]
            z = torch.zeros_like(pre).reshape(S, B * n).scatter(1, pos, torch.relu(vals))
            return z.reshape(S, B, n), vals
        vals, idx = pre.topk(k, dim=-1)  # [S, B, k]
        acts = torch.where(torch.isfinite(vals), vals, 0.0) if linear else torch.relu(vals)
        return torch.zeros_like(pre).scatter(-1, idx, acts), vals

    def step(self, x: torch.Tensor) -> None:
        """x [S, B, d_in] raw activations; updates the parameters (no host sync)."""
        cfg, dt = self.cfg, self.enc_dtype
        S, B, _ = x.shape
        assert self.scale is not None  # fixed by the first chunk
        x = x.float() * self.scale[:, None, None]
        if self.dim is not None:
            x = x * self.dim[:, None, :]
        xc = x - self.b_dec[:, None, :]
        pre = torch.baddbmm(self.b_enc[:, None, :].to(dt), xc.to(dt), self.W_enc.to(dt))
        batch_level = cfg.architecture == "batchtopk"
        z, vals = self._code(pre, cfg.k, batch_level)  # [S, B, n]
        W_dec = self.W_dec.to(dt)
        recon = torch.bmm(z, W_dec).float() + self.b_dec[:, None, :]
        err = recon - x
        mse = err.pow(2).sum((1, 2)) / B  # [S]
        # AuxK: the top aux_k pre-activations among dead latents explain the residual error.
        with torch.no_grad():
            dead = self.since_fired > self.dead_tokens  # [S, n]
            has_dead = dead.any(1)
        masked = pre.masked_fill(~dead[:, None, :], float("-inf"))
        az, _ = self._code(masked, min(self.aux_k, self.n), False,
                           linear=cfg.aux_activation == "linear")
        arecon = torch.bmm(az, W_dec).float()
        aux = (arecon - err.detach().neg()).pow(2).sum((1, 2)) / B * has_dead  # [S]
        loss = (mse + cfg.aux_coef * aux).sum()
        for p in self.params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            g = self.W_dec.grad  # keep decoder rows on the unit sphere
            assert g is not None
            g.addcmul_(torch.linalg.vecdot(g, self.W_dec)[..., None], self.W_dec, value=-1)
            for group in self.opt.param_groups:
                group["lr"] = _lr_at(cfg, self.steps_total, self.step_i)
            self.opt.step()
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            on = z > 0
            fired = on.any(1)  # [S, n]
            self.since_fired += B
            self.since_fired.masked_fill_(fired, 0)
            self.fired_ever |= fired
            if batch_level and self.step_i >= _threshold_from(cfg, self.steps_total):
                pos = vals > 0
                least = torch.where(pos, vals, torch.inf).amin(1).double()
                self.thr_sum += torch.where(pos.any(1), least, 0.0)
                self.thr_count += pos.any(1)
            var = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
            self._last = {"fvu": err.pow(2).sum((1, 2)) / var, "l0": on.sum((1, 2)) / B,
                          "dead": dead.float().mean(1), "loss": mse + cfg.aux_coef * aux,
                          "aux": aux}
        self.step_i += 1

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """x [S, N, d_in] raw chunk: SAETrainer.resample for each SAE of the stack."""
        cfg = self.cfg
        if not cfg.resample_dead or self.step_i >= _decay_start(cfg, self.steps_total):
            return 0
        assert self.scale is not None
        total = 0
        for i in range(self.S):
            dead = self.since_fired[i] > self.dead_tokens
            n_dead = int(dead.sum())
            if n_dead == 0:
                continue
            xs = x[i].float() * self.scale[i]
            if self.dim is not None:
                xs = xs * self.dim[i]
            err = torch.cat([(self._reconstruct(i, xb) - xb).pow(2).sum(1)
                             for xb in xs.split(cfg.batch_size)])  # [N]
            gen = torch.Generator().manual_seed(self.seeds[i] * 1_000_003 + self.step_i)
            idx = torch.multinomial(err.cpu().double() + 1e-12, n_dead,
                                    replacement=n_dead > len(err), generator=gen).to(xs.device)
            _reset_latents(dead, xs[idx] - self.b_dec[i], self.W_enc[i], self.W_dec[i],
                           self.b_enc[i], _moments(self, i))
            self.since_fired[i][dead] = 0
            total += n_dead
        return total

    def _reconstruct(self, i: int, xs: torch.Tensor) -> torch.Tensor:
        """xs [B, d_in] scaled inputs of SAE i -> its reconstruction [B, d_in]."""
        pre = torch.addmm(self.b_enc[i], xs - self.b_dec[i], self.W_enc[i])[None]
        z, _ = self._code(pre, self.cfg.k, self.cfg.architecture == "batchtopk")
        return z[0] @ self.W_dec[i] + self.b_dec[i]

    def metrics(self) -> list[dict]:
        """The last step's metrics, one dict per SAE (one host sync)."""
        cols = {k: v.detach().float().cpu().tolist() for k, v in self._last.items()}
        return [{k: cols[k][i] for k in cols} for i in range(self.S)]

    def export(self, i: int, metadata: dict) -> SAE:
        cfg = self.cfg
        threshold = None
        if cfg.architecture == "batchtopk":
            theta = float(self.thr_sum[i]) / max(1, int(self.thr_count[i]))
            threshold = torch.full((self.n,), theta)
        W_enc = self.W_enc[i].detach().float().cpu()
        W_dec = self.W_dec[i].detach().float().cpu()
        b_dec = self.b_dec[i].detach().float().cpu()
        if self.dim is not None:
            v = self.dim[i].float().cpu()
            W_enc, W_dec, b_dec = _fold_dim_scale(W_enc, W_dec, b_dec, v)
            metadata = {**metadata, **_dim_scale_metadata(v, cfg.dim_cap)}
        return SAE(W_enc=W_enc.contiguous(), W_dec=W_dec,
                   b_enc=self.b_enc[i].detach().float().cpu(), b_dec=b_dec,
                   architecture=cfg.architecture, threshold=threshold, k=cfg.k,
                   apply_b_dec_to_input=True, input_scale=self.scales[i],
                   batchtopk_inference="jumprelu", metadata=metadata)

    # --- checkpoints: one SAETrainer-shaped state per SAE, so either engine can resume ---------
    def state_dict(self, i: int) -> dict:
        opt = self.opt.state_dict()
        per = {j: {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                   for k, v in st.items()} for j, st in opt["state"].items()}
        m = self.metrics()[i] if self._last else {}
        return {"params": [p[i].detach().clone() for p in self.params],
                "opt": {"state": per, "param_groups": opt["param_groups"]},
                "input_scale": None if self.scale is None else self.scales[i],
                "dim_scale": None if self.dim is None else self.dim[i].clone(),
                "step_i": self.step_i, "since_fired": self.since_fired[i].clone(),
                "fired_ever": self.fired_ever[i].clone(),
                "thr": (float(self.thr_sum[i]), int(self.thr_count[i])), "last": m}

    def load_state_dicts(self, states: list[dict]) -> None:
        dev = self.W_enc.device
        with torch.no_grad():
            for j, p in enumerate(self.params):
                p.copy_(torch.stack([s["params"][j] for s in states]).to(dev))
        opt = self.opt.state_dict()
        first = states[0]["opt"]["state"]
        opt["state"] = {j: {k: (torch.stack([s["opt"]["state"][j][k] for s in states]).to(dev)
                                if torch.is_tensor(v) and v.dim() > 0 else v)
                            for k, v in st.items()} for j, st in first.items()}
        opt["param_groups"] = states[0]["opt"]["param_groups"]
        self.opt.load_state_dict(opt)
        self.scales = [s["input_scale"] for s in states]
        self.scale = None if self.scales[0] is None else torch.tensor(self.scales, device=dev)
        dims = [s.get("dim_scale") for s in states]  # all set, or none (one config)
        self.dim = None if dims[0] is None else torch.stack([d for d in dims if d is not None]).to(dev)
        self.step_i = states[0]["step_i"]
        self.since_fired.copy_(torch.stack([s["since_fired"] for s in states]))
        self.fired_ever.copy_(torch.stack([s["fired_ever"] for s in states]))
        self.thr_sum.copy_(torch.tensor([float(s["thr"][0]) for s in states]))
        self.thr_count.copy_(torch.tensor([int(s["thr"][1]) for s in states]))


class _OneSAE:
    """A SAETrainer behind StackedTrainer's group interface (a group of one, x [1, ...])."""

    engine = "sparse"

    def __init__(self, trainer: SAETrainer):
        self.t = trainer

    @property
    def input_scale(self):
        return self.t.input_scale

    @property
    def step_i(self):
        return self.t.step_i

    def init_from(self, x):
        self.t.init_from(x[0])

    def step(self, x):
        self.t.step(x[0])

    def resample(self, x):
        return self.t.resample(x[0])

    def metrics(self):
        return [self.t.last]

    def export(self, i, metadata):
        return self.t.export(metadata)

    def state_dict(self, i):
        return self.t.state_dict()

    def load_state_dicts(self, states):
        self.t.load_state_dict(states[0])


def _make_groups(model, cfg: TrainConfig, slots, steps_total, device, enc_dtype,
                 family_slots=None):
    """[(slots, trainer)]: one stacked trainer per input width, or one SAETrainer per slot.
    Each SAE's seed is its place in `family_slots` (the whole family; default `slots`)."""
    engine = cfg.engine
    if engine == "auto":
        engine = "stacked" if torch.device(device).type == "cuda" else "sparse"
    seed = {s: cfg.seed * 100_003 + i for i, s in enumerate(family_slots or slots)}
    if engine == "sparse":
        return [([s], _OneSAE(SAETrainer(model.width(s[0]), cfg, steps_total, device, seed[s],
                                         enc_dtype))) for s in slots]
    by_width: dict[int, list] = {}
    for s in slots:
        by_width.setdefault(model.width(s[0]), []).append(s)
    return [(group, StackedTrainer(w, cfg, steps_total, device, [seed[s] for s in group],
                                   enc_dtype)) for w, group in by_width.items()]


# --- the family loop --------------------------------------------------------------------------------
@dataclass
class TrainResult:
    pack: Pack
    wall_seconds: float
    tokens: int
    metrics: dict


def count_tokens(corpus: Corpus, tokenizer, cfg: TrainConfig, limit: int) -> int:
    """Content tokens the corpus can give (stops counting at `limit`)."""
    n = 0
    for b in corpus.token_batches(tokenizer, cfg.model_batch, cfg.ctx_len):
        n += int(b.content_mask().sum())
        if n >= limit:
            break
    return n


def prepare_training(model, cfg: TrainConfig, out: Path, overwrite: bool
                     ) -> tuple[TrainConfig, dict, TrainResult | None]:
    """(a checked copy of cfg with its layers filled in, the run's identity, the finished result
    when `out` already holds this very pack). Refuses to write over another pack or a folder that
    is not a pack, unless `overwrite`: nothing is touched before the checks pass."""
    cfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})
    cfg.layers = cfg.layers if cfg.layers is not None else list(range(model.n_layers))
    cfg.validate(model)
    # "auto" dtypes become the concrete ones of this device here, once: the identity, the
    # checkpoint and every Ray group then carry the same dtype (issue 30).
    cfg.encoder_dtype = dtype_name(resolve_encoder_dtype(cfg.encoder_dtype, model.device))
    cfg.model_dtype = dtype_name(resolve_encoder_dtype(cfg.model_dtype, model.device))
    ident = {"model": model.name, **cfg.identity()}
    if (out / PACK_MANIFEST).is_file() and not overwrite:
        existing = load_pack(out)
        if pack_identity(existing.provenance) == ident:
            return cfg, ident, TrainResult(existing, existing.provenance.get("wall_seconds", 0.0),
                                           existing.provenance.get("tokens", 0), {})
        raise FileExistsError(f"{out} holds a different pack; pass --overwrite to replace it, "
                              f"or choose another --out")
    if out.exists() and not (out / PACK_MANIFEST).is_file() and any(out.iterdir()) \
            and not overwrite:
        raise FileExistsError(f"{out} exists and is not a saeflow pack; refusing to write there "
                              f"(pass --overwrite, or choose another --out)")
    return cfg, ident, None


def pack_identity(provenance: dict) -> dict | None:
    """The training identity a pack records. Packs trained before dtypes were resolved in the
    identity say "auto" there; the dtypes they ran in are in the provenance beside it."""
    ident = provenance.get("train_config")
    if not isinstance(ident, dict):
        return None
    ident = dict(ident)
    for key, ran in (("encoder_dtype", "encoder_dtype"), ("model_dtype", "capture_dtype")):
        if ident.get(key) == "auto" and provenance.get(ran):
            ident[key] = provenance[ran]
    return ident


def check_resume(saved: dict | None, ident: dict, ckpt_dir: Path) -> None:
    """Refuse to resume a checkpoint of another run, naming a dtype difference plainly (a
    resume across dtypes would mix two numerics in one pack)."""
    if saved == ident:
        return
    saved = saved or {}
    for key in ("encoder_dtype", "model_dtype"):
        if key in saved and saved.get(key) != ident.get(key):
            raise TrainingError(
                f"{ckpt_dir} was trained with {key} {saved[key]}, but this run resolves "
                f"{ident.get(key)}; pass {flag(key)} {saved[key]} to resume it, or --overwrite "
                f"to start over")
    raise TrainingError(f"{ckpt_dir} holds a checkpoint of a different training run; delete it "
                        f"or pass --overwrite")


def train_family(model: LoadedModel, cfg: TrainConfig, out: str | os.PathLike,
                 overwrite: bool = False, progress: bool = True,
                 stop_after_chunks: int | None = None, family_slots=None) -> TrainResult:
    """Train every (position, layer) SAE of `cfg` from one pass over the corpus; write a pack.

    Resumes from OUT.ckpt/ when it holds a checkpoint of the same configuration.
    stop_after_chunks: stop (as if interrupted) after that many chunks, for tests.
    family_slots: when this call trains a group of a larger family (saeflow.scale), the
    family's (position, layer) list, so each SAE keeps the seed it has in the whole family.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    cfg, ident, done = prepare_training(model, cfg, out, overwrite)
    if done is not None:
        return done
    assert cfg.layers is not None  # prepare_training fills them in
    ckpt_dir = out.with_name(out.name + ".ckpt")

    corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
    device = model.device
    enc_dtype = resolve_encoder_dtype(cfg.encoder_dtype, device)  # concrete: prepare_training
    cap_dtype = resolve_encoder_dtype(cfg.model_dtype, device)
    slots = [(p, L) for p in cfg.positions for L in cfg.layers]
    steps_per_chunk = cfg.chunk_tokens // cfg.batch_size
    n_chunks = math.ceil(cfg.tokens / cfg.chunk_tokens)
    steps_total = n_chunks * steps_per_chunk

    state = None
    if (ckpt_dir / CKPT_FILE).is_file():
        state = torch.load(ckpt_dir / CKPT_FILE, map_location=device, weights_only=False)
        if overwrite and state.get("ident") != ident:
            state = None
            shutil.rmtree(ckpt_dir)
        else:
            check_resume(state.get("ident"), ident, ckpt_dir)
    elif ckpt_dir.exists() and overwrite:
        shutil.rmtree(ckpt_dir)
    if state is None:
        have = count_tokens(corpus, model.tokenizer, cfg, cfg.tokens)
        if have < cfg.tokens:
            raise ConfigError(f"the corpus {cfg.corpus!r} has only {have} training tokens, fewer "
                             f"than --tokens {cfg.tokens}; lower --tokens or add sources "
                             f"with --corpus")

    groups = _make_groups(model, cfg, slots, steps_total, device, enc_dtype, family_slots)
    gen = torch.Generator().manual_seed(cfg.seed)
    chunk_i, wall_before = 0, 0.0
    if state is not None:
        for group, t in groups:
            t.load_state_dicts([state["saes"][s] for s in group])
        gen.set_state(state["rng"].cpu())  # map_location moved it; a Generator wants a CPU tensor
        chunk_i, wall_before = state["chunk"], state["wall"]
    last_of: dict = {}

    orig_dtype = model.dtype
    backup = None
    if cap_dtype != orig_dtype:
        # A dtype round trip would leave the caller's weights rounded: restore them exactly.
        backup = {k: v.detach().to("cpu", copy=True) for k, v in model.hf.state_dict().items()}
        model.hf.to(cap_dtype)
    points = [HookPoint(p, L) for p, L in slots]
    t_start = time.perf_counter()
    last_ckpt = time.perf_counter()
    bar = tqdm(total=n_chunks * cfg.chunk_tokens, initial=chunk_i * cfg.chunk_tokens, unit="tok",
               unit_scale=True, desc=f"training {len(slots)} SAEs", disable=not progress,
               smoothing=0.1)

    def save_ckpt():
        tmp = ckpt_dir / (CKPT_FILE + ".tmp")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"ident": ident, "chunk": chunk_i, "rng": gen.get_state(),
                    "wall": wall_before + time.perf_counter() - t_start,
                    "saes": {s: t.state_dict(i) for group, t in groups
                             for i, s in enumerate(group)}}, tmp)
        os.replace(tmp, ckpt_dir / CKPT_FILE)

    try:
        batches = corpus.token_batches(model.tokenizer, cfg.model_batch, cfg.ctx_len)
        # Skip what earlier runs consumed: tokenising only.
        buffers: dict = {s: [] for s in slots}
        n_buf = 0
        chunk_seen, skip_chunks = 0, chunk_i  # chunks done by earlier runs
        for b in batches:
            if chunk_seen < skip_chunks:
                n_buf += int(b.content_mask().sum())
                if n_buf >= cfg.chunk_tokens:
                    chunk_seen += 1
                    n_buf = 0
                continue
            if chunk_i >= n_chunks:
                break
            mask = b.content_mask()
            acts = capture(model, b.input_ids, points, attention_mask=b.attention_mask)
            m = mask.to(device)
            for (p, L), a in zip(slots, (acts[pt] for pt in points)):
                buffers[(p, L)].append(a[m])
            n_buf += int(mask.sum())
            if n_buf < cfg.chunk_tokens:
                continue
            # A full chunk: shuffle and train each SAE on exactly chunk_tokens tokens.
            perm = torch.randperm(n_buf, generator=gen)[:cfg.chunk_tokens].to(device)
            for group, t in groups:
                x = torch.stack([torch.cat(buffers[s])[perm] for s in group])  # [S, N, d_in]
                for s in group:
                    buffers[s] = []
                if t.input_scale is None:
                    t.init_from(x)
                t.resample(x)
                for b0 in range(0, x.shape[1], cfg.batch_size):
                    try:
                        t.step(x[:, b0:b0 + cfg.batch_size])
                    except TrainingError as e:
                        raise TrainingError(
                            f"{e} in the SAE at {group[0][0]} layer {group[0][1]} (step "
                            f"{t.step_i}); stopped. The last good checkpoint is kept in "
                            f"{ckpt_dir}; try a lower --lr") from None
                for s, m in zip(group, t.metrics()):  # once per chunk: one host sync per group
                    if not math.isfinite(m["loss"]) or m["fvu"] > 1e3:
                        raise TrainingError(
                            f"loss is {m['loss']} (FVU {m['fvu']:.3g}) in the SAE at {s[0]} "
                            f"layer {s[1]} (step {t.step_i}); stopped. The last good checkpoint "
                            f"is kept in {ckpt_dir}; try a lower --lr")
                    last_of[s] = m
            n_buf = 0
            chunk_i += 1
            bar.update(cfg.chunk_tokens)
            lasts = list(last_of.values())
            bar.set_postfix(fvu=f"{sum(x['fvu'] for x in lasts) / len(lasts):.3f}",
                            l0=f"{sum(x['l0'] for x in lasts) / len(lasts):.1f}",
                            dead=f"{sum(x['dead'] for x in lasts) / len(lasts):.3f}")
            if stop_after_chunks is not None and chunk_i >= stop_after_chunks and chunk_i < n_chunks:
                save_ckpt()
                raise KeyboardInterrupt("stop_after_chunks")
            if time.perf_counter() - last_ckpt > cfg.checkpoint_every_s and chunk_i < n_chunks:
                save_ckpt()
                last_ckpt = time.perf_counter()
        if chunk_i < n_chunks:
            raise ConfigError(f"the corpus ran out after {chunk_i} of {n_chunks} chunks")
    finally:
        bar.close()
        if backup is not None:  # leave the caller's model as it was, whatever happened
            model.hf.to(orig_dtype)
            model.hf.load_state_dict(backup)

    wall = wall_before + time.perf_counter() - t_start
    metrics = {f"{p}/{L}": last_of.get((p, L), {}) for p, L in slots}
    prov = {"trained_by": f"saeflow {__version__}", "model": model.name, "model_source": model.source,
            "corpus": corpus.describe(), "tokens": n_chunks * cfg.chunk_tokens, "seed": cfg.seed,
            "wall_seconds": round(wall, 1), "train_config": ident,
            "capture_dtype": str(cap_dtype).removeprefix("torch."),
            "engine": groups[0][1].engine,
            "encoder_dtype": str(enc_dtype).removeprefix("torch."), "final_train_metrics": metrics}
    exported = {s: t.export(i, {"position": s[0], "layer": s[1]})
                for group, t in groups for i, s in enumerate(group)}
    saes = ((p, L, exported[(p, L)]) for p, L in slots)
    pack = save_pack(saes, out, model_name=model.name, d_model=model.d_model,
                     n_layers=model.n_layers, provenance=prov, overwrite=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainResult(pack, wall, n_chunks * cfg.chunk_tokens, metrics)
