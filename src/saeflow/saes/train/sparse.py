"""The per-SAE engine: one SAE stepped alone with sparse products (fastest on a CPU).

The encoder runs in bf16 when that is faster (CPU with avx512_bf16, or a GPU); only the
selected pre-activations carry gradient, so the encoder's backward is a sparse product
(kernels.GatherPre) instead of a dense batch x d_sae one; decoding is an embedding_bag (a gather
of k rows) rather than a dense matmul. AuxK runs dense on the block of dead latents, and the
encoder is held transposed, so its gradient needs no copy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saeflow.errors import TrainingError
from saeflow.saes.sae import SAE
from saeflow.saes.train import recipe
from saeflow.saes.train.config import TrainConfig
from saeflow.saes.train.kernels import BlockPre, GatherPre, csr_rows
from saeflow.saes.train.recipe import ChunkRows


def _single(x: ChunkRows) -> torch.Tensor:
    """The one SAE's inputs [N, d_in], from [N, d_in] or the family loop's stack [1, N, d_in]."""
    return x[0] if len(x.shape) == 3 else x  # type: ignore[return-value]


def _flip(v):
    """A contiguous transposed copy of a 2-D tensor; anything else as it is."""
    return v.t().contiguous() if torch.is_tensor(v) and v.dim() == 2 else v


class SAETrainer:
    """Parameters, optimiser and counters of one SAE in training: an `Engine` with S = 1, whose
    methods also take one SAE's inputs unstacked (x [N, d_in])."""

    engine = "sparse"

    def __init__(self, d_in: int, cfg: TrainConfig, steps_total: int, device, seed: int,
                 enc_dtype: torch.dtype):
        self.cfg, self.d_in, self.n = cfg, d_in, cfg.width
        self.steps_total, self.enc_dtype = steps_total, enc_dtype
        self.seed = seed
        W_dec = recipe.init_decoder(self.n, d_in, seed)
        # The encoder is held as its transpose W_enc_t [n, d_in] (tied init: W_dec itself): the
        # sparse backward forms grad W_enc^T = G^T xc, which lands in .grad as it is, with no
        # transposing copy per step. `W_enc` [d_in, n] is a view of it.
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
        self.aux_k = recipe.aux_k_of(cfg, d_in)
        self.dead_tokens = recipe.dead_tokens_of(cfg)
        self.last: dict = {}

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder [d_in, n], a view of W_enc_t."""
        return self.W_enc_t.t()

    @property
    def initialised(self) -> bool:
        return self.input_scale is not None

    def _view(self) -> recipe.SAEView:
        return recipe.SAEView(self.W_enc, self.W_dec, self.b_enc, self.b_dec)

    @torch.no_grad()
    def init_from(self, x: ChunkRows) -> None:
        """x [N, d_in] (first chunk): fix the input scale and start b_dec at the geometric median."""
        init = recipe.init_scales(_single(x).float()[None], self.cfg, ratio_in_float32=True)
        self.input_scale = init.input_scale[0]
        self.dim_scale = None if init.dim_scale is None else init.dim_scale[0]
        self.b_dec.copy_(init.median[0])

    def lr_at(self, step: int) -> float:
        return recipe.lr_at(self.cfg, self.steps_total, step)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        assert self.input_scale is not None  # fixed by the first chunk
        x = x.float() * self.input_scale
        return x if self.dim_scale is None else x * self.dim_scale

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
            if keep.any() and self.step_i >= recipe.threshold_from(self.cfg, self.steps_total):
                self.thr_sum += float(vals[keep].min().float())
                self.thr_count += 1
        return rows, cols

    def step(self, x: torch.Tensor) -> dict:
        """x [B, d_in] (or [1, B, d_in]) raw activations -> metrics; updates the parameters."""
        x = self._scaled(_single(x))
        B = x.shape[0]
        with torch.no_grad():
            xc = x - self.b_dec
            dt = self.enc_dtype  # pre [B, d_sae] stays in this dtype; only selected values go fp32
            pre = torch.addmm(self.b_enc.to(dt), xc.to(dt), self.W_enc.to(dt))
            rows, cols = self._select(pre)
            crow = csr_rows(rows, B)
        vals = GatherPre.apply(pre[rows, cols].float(), xc, self.W_enc, self.b_enc, self.b_dec,
                               cols, crow)
        acts = torch.relu(vals)
        recon = F.embedding_bag(cols, self.W_dec, crow[:-1], mode="sum",
                                per_sample_weights=acts) + self.b_dec
        err = recon - x
        loss = err.pow(2).sum() / B
        with torch.no_grad():
            dead = self.since_fired > self.dead_tokens
            n_dead = int(dead.sum())
        aux = torch.zeros((), device=x.device)
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        dead_cols = None
        if n_dead > 0:
            dead_cols = dead.nonzero().squeeze(1)  # [n_dead]
            aux, blocks = self._aux_loss(pre, xc, (x - recon).detach(), dead_cols)
            loss = loss + self.cfg.aux_coef * aux
        for p in self.params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for blk, P in blocks:  # the AuxK block's gradients, into the full ones
                if blk.grad is not None and dead_cols is not None:
                    assert P.grad is not None  # the main loss reaches every parameter
                    P.grad.index_add_(0, dead_cols, blk.grad)
            self._update(cols, B)
            var = (x - x.mean(0)).pow(2).sum()
            self.last = {"fvu": float(err.pow(2).sum() / var.clamp_min(1e-12)),
                         "l0": cols.numel() / B, "dead": n_dead / self.n,
                         "loss": float(loss), "aux": float(aux)}
        self.step_i += 1
        if not math.isfinite(self.last["loss"]) or self.last["fvu"] > 1e3:
            raise TrainingError(f"loss is {self.last['loss']} (FVU {self.last['fvu']:.3g})")
        return self.last

    def _aux_loss(self, pre, xc, resid, dead_cols):
        """AuxK: dead latents `dead_cols` [n_dead] try to explain the residual error resid
        [B, d_in]. Dense on the dead block (a few % of the width: one GEMM beats a sparse
        product); its rows are leaves of their own, added into the full gradients after
        backward, so no full-size zero gradient is built for them. -> (loss, blocks)."""
        n_dead = len(dead_cols)
        ka = min(self.aux_k, n_dead)
        with torch.no_grad():
            ablock = pre[:, dead_cols].float()  # [B, n_dead]
            if ka < n_dead:  # only the top ka dead latents of each row take part
                keep = torch.zeros_like(ablock).scatter_(1, ablock.topk(ka, dim=1).indices, 1.0)
        blocks = [(P[dead_cols].detach().requires_grad_(), P)
                  for P in (self.W_enc_t, self.b_enc, self.W_dec)]
        (We, _), (be, _), (Wd, _) = blocks
        avals = BlockPre.apply(ablock, xc, We, be, self.b_dec)  # [B, n_dead]
        if ka < n_dead:
            avals = avals * keep
        if self.cfg.aux_activation == "relu":
            avals = torch.relu(avals)
        arecon = avals @ Wd  # [B, d_in]
        # Same units as the main loss (squared error per token), as in Gao et al.
        return (arecon - resid).pow(2).sum() / xc.shape[0], blocks

    @torch.no_grad()
    def _update(self, cols: torch.Tensor, B: int) -> None:
        """The optimiser step with W_dec's rows kept on the unit sphere (radial part of their
        gradient dropped, then renormalised), and the firing counters."""
        g = self.W_dec.grad
        assert g is not None
        g.addcmul_(torch.linalg.vecdot(g, self.W_dec)[:, None], self.W_dec, value=-1)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_i)
        self.opt.step()
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        fired = torch.zeros(self.n, dtype=torch.bool, device=cols.device)
        fired[cols] = True
        self.since_fired += B
        self.since_fired[fired] = 0
        self.fired_ever |= fired

    @torch.no_grad()
    def resample(self, x: ChunkRows) -> int:
        """x [N, d_in] (or [1, N, d_in]) raw chunk: re-initialise the dead latents
        (cfg.resample_dead) before the lr decay (recipe.resample_sae); returns how many."""
        if not self.cfg.resample_dead or self.step_i >= recipe.decay_start(self.cfg,
                                                                           self.steps_total):
            return 0
        dead = self.since_fired > self.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        recipe.resample_sae(self._scaled(_single(x)), dead, sae=self._view(),
                            moments=recipe.moments(self), reconstruct=self._reconstruct,
                            batch_size=self.cfg.batch_size,
                            seed=recipe.resample_seed(self.seed, self.step_i))
        self.since_fired[dead] = 0
        return n_dead

    def _reconstruct(self, xs: torch.Tensor) -> torch.Tensor:
        """xs [B, d_in] scaled inputs -> reconstruction [B, d_in], with the training activation."""
        pre = torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc)
        saved = self.thr_sum, self.thr_count  # no BatchTopK threshold bookkeeping here
        try:
            rows, cols = self._select(pre)
        finally:
            self.thr_sum, self.thr_count = saved
        acts = torch.relu(pre[rows, cols])
        return F.embedding_bag(cols, self.W_dec, csr_rows(rows, xs.shape[0])[:-1], mode="sum",
                               per_sample_weights=acts) + self.b_dec

    def metrics(self) -> list[dict]:
        return [self.last]

    # --- export / state ---------------------------------------------------------------------------
    def export(self, metadata: dict, i: int = 0) -> SAE:
        assert self.input_scale is not None  # fixed by the first chunk
        return recipe.export_sae(self._view(), self.cfg, input_scale=self.input_scale,
                                 dim_scale=self.dim_scale,
                                 threshold=self.thr_sum / max(1, self.thr_count),
                                 metadata=metadata)

    def state_dict(self, i: int = 0) -> dict:
        """A checkpoint with W_enc and its Adam moments as [d_in, n], the layout StackedTrainer
        and earlier versions use, so either engine resumes either's checkpoints."""
        opt = self.opt.state_dict()
        opt["state"] = {j: {k: _flip(v) if j == 0 else v for k, v in st.items()}
                        for j, st in opt["state"].items()}
        return recipe.sae_state(
            params=[_flip(p.detach()) if j == 0 else p.detach().clone()
                    for j, p in enumerate(self.params)], opt=opt,
            input_scale=self.input_scale, dim_scale=self.dim_scale, step_i=self.step_i,
            since_fired=self.since_fired.clone(), fired_ever=self.fired_ever.clone(),
            thr=(self.thr_sum, self.thr_count), last=self.last)

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

    def load_state_dicts(self, states: list[dict]) -> None:
        (state,) = states
        self.load_state_dict(state)
