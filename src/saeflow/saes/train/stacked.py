"""The stacked engine: the SAEs of one input width stepped as one batched dense problem (bmm;
fastest on a GPU)."""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from saeflow.saes.sae import SAE
from saeflow.saes.train import recipe
from saeflow.saes.train.config import TrainConfig
from saeflow.saes.train.recipe import ChunkRows
from saeflow.saes.train.stacked_kernels import (
    CodeFn,
    DeadBound,
    StackedEncoder,
    aux_compact,
    code,
)

# The first chunk's init runs on blocks of SAEs of at most this many float32 bytes: its
# temporaries are ~4 copies of a block, not of the chunk (54 x 131k x 640 x 4 B = 18 GB each).
INIT_BLOCK_BYTES = 1 << 30


class _Step(NamedTuple):
    """What a step's update and metrics keep from its forward pass."""

    x: torch.Tensor  # [S, B, d_in] scaled inputs
    z: torch.Tensor  # [S, B, n] code
    vals: torch.Tensor  # the top pre-activations (per row [S, B, k], or per batch [S, B*k])
    err: torch.Tensor  # [S, B, d_in] reconstruction error
    dead: torch.Tensor  # [S, n] dead before the step
    mse: torch.Tensor  # [S]
    aux: torch.Tensor  # [S]


class StackedTrainer:
    """S SAEs of one input width trained as one batched problem, for GPUs.

    The same recipe as SAETrainer, step for step (same init per seed, same losses, same Adam),
    but dense and batched: pre-activations [S, B, n] from one bmm, TopK / BatchTopK as a scatter
    into a dense code, decoding as a second bmm, gradients from autograd (the encoder's from
    StackedEncoder, without the input gradient). Nothing in a step waits for the device:
    dead-latent bookkeeping and the metrics stay on it, metrics are read once per chunk
    (`metrics()`), and AuxK runs only when a latent can be dead, by a bound the host keeps from
    lagged reads (`DeadBound`; on the dead latents alone when each SAE has at most aux_k). In
    fp32 it equals SAETrainer to rounding; with a bf16 `enc_dtype` both products run in bf16
    (parameters, Adam and losses stay fp32). `compile_code` (default: SAEFLOW_COMPILE=1 on
    CUDA) runs the TopK code through torch.compile, eager if that fails.
    """

    engine = "stacked"

    def __init__(self, d_in: int, cfg: TrainConfig, steps_total: int, device, seeds: list[int],
                 enc_dtype: torch.dtype, compile_code: bool | None = None):
        self.cfg, self.d_in, self.n, self.S = cfg, d_in, cfg.width, len(seeds)
        self.steps_total, self.enc_dtype, self.seeds = steps_total, enc_dtype, list(seeds)
        W_dec = torch.stack([recipe.init_decoder(self.n, d_in, s) for s in seeds])  # [S, n, d_in]
        self.W_enc = W_dec.transpose(1, 2).contiguous().to(device).requires_grad_()  # [S, d_in, n]
        self.W_dec = W_dec.to(device).requires_grad_()
        self.b_enc = torch.zeros(self.S, self.n, device=device, requires_grad=True)
        self.b_dec = torch.zeros(self.S, d_in, device=device, requires_grad=True)
        self.params = [self.W_enc, self.W_dec, self.b_enc, self.b_dec]
        fused = torch.device(device).type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        self.input_scale: torch.Tensor | None = None  # [S] single factors, fixed by the first chunk
        self.input_scales: list[float] = []  # the same as Python floats, as SAETrainer keeps them
        self.dim_scale: torch.Tensor | None = None  # [S, d_in] with input_norm "dim"
        self.step_i = 0
        self.since_fired = torch.zeros(self.S, self.n, dtype=torch.long, device=device)
        self.fired_ever = torch.zeros(self.S, self.n, dtype=torch.bool, device=device)
        self.thr_sum = torch.zeros(self.S, dtype=torch.float64, device=device)
        self.thr_count = torch.zeros(self.S, dtype=torch.long, device=device)
        self.aux_k = recipe.aux_k_of(cfg, d_in)
        self.dead_tokens = recipe.dead_tokens_of(cfg)
        self._last: dict[str, torch.Tensor] = {}  # metric -> [S], on the device
        self._bound = DeadBound(self.since_fired, self.dead_tokens, cfg.batch_size)
        self.aux_path = ""  # the last step's AuxK: "skip" | "compact" | "dense"
        if compile_code is None:
            compile_code = (os.environ.get("SAEFLOW_COMPILE") == "1"
                            and torch.device(device).type == "cuda")
        self._code_fn = CodeFn(compile_code)

    @property
    def initialised(self) -> bool:
        return self.input_scale is not None

    def _view(self, i: int) -> recipe.SAEView:
        return recipe.SAEView(self.W_enc[i], self.W_dec[i], self.b_enc[i], self.b_dec[i])

    @torch.no_grad()
    def init_from(self, x: ChunkRows) -> None:
        """x [S, N, d_in] (first chunk): input scales and b_dec at the geometric medians,
        computed on blocks of SAEs (each SAE's figures are bit-identical to one big batch)."""
        S, N, d_in = x.shape
        per = max(1, INIT_BLOCK_BYTES // (N * d_in * 4))
        parts = [recipe.init_scales(x[a:a + per].float(), self.cfg, ratio_in_float32=False)
                 for a in range(0, S, per)]
        self.input_scales = [s for p in parts for s in p.input_scale]
        dims = [p.dim_scale for p in parts if p.dim_scale is not None]
        self.dim_scale = torch.cat(dims) if dims else None  # [S, d_in]
        self.input_scale = torch.tensor(self.input_scales, device=x.device)  # [S]
        self.b_dec.copy_(torch.cat([p.median for p in parts]))

    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, _Step]:
        """The summed loss of a step on raw x [S, B, d_in], and what the update needs."""
        cfg = self.cfg
        assert self.input_scale is not None  # fixed by the first chunk
        x = x.float() * self.input_scale[:, None, None]
        if self.dim_scale is not None:
            x = x * self.dim_scale[:, None, :]
        pre = StackedEncoder.apply(x, self.W_enc, self.b_enc, self.b_dec, self.enc_dtype)
        z, vals = self._code_fn(pre, cfg.k, cfg.architecture == "batchtopk")  # [S, B, n]
        W_dec = self.W_dec.to(self.enc_dtype)
        recon = torch.bmm(z, W_dec).float() + self.b_dec[:, None, :]
        err = recon - x  # [S, B, d_in]
        mse = err.pow(2).sum((1, 2)) / x.shape[1]  # [S]
        with torch.no_grad():
            dead = self.since_fired > self.dead_tokens  # [S, n]
        aux = self._aux(pre, W_dec, err, dead)  # [S]
        return (mse + cfg.aux_coef * aux).sum(), _Step(x, z, vals, err, dead, mse, aux)

    def _aux(self, pre: torch.Tensor, W_dec: torch.Tensor, err: torch.Tensor,
             dead: torch.Tensor) -> torch.Tensor:
        """AuxK [S]: the top aux_k pre-activations among dead latents explain the residual
        error; 0 for an SAE without dead latents. Skipped when the host-side bound shows none
        can be dead, and computed on the dead latents only when each SAE has at most aux_k."""
        S, B, _ = pre.shape
        aux_k = min(self.aux_k, self.n)
        self.aux_path, m = self._bound.plan(aux_k)
        if self.aux_path == "skip":
            return torch.zeros(S, device=pre.device)
        linear = self.cfg.aux_activation == "linear"
        if self.aux_path == "compact":
            arecon = aux_compact(pre, W_dec, self.since_fired, self.dead_tokens, m, linear)
        else:
            masked = pre.masked_fill(~dead[:, None, :], float("-inf"))
            az, _ = code(masked, aux_k, False, linear=linear)
            arecon = torch.bmm(az, W_dec)
        return (arecon.float() - err.detach().neg()).pow(2).sum((1, 2)) / B * dead.any(1)

    def step(self, x: torch.Tensor) -> None:
        """x [S, B, d_in] raw activations; updates the parameters (no host sync)."""
        loss, st = self._loss(x)
        for p in self.params:
            p.grad = None
        loss.backward()
        self._update(st)
        self.step_i += 1
        self._bound.stepped(x.shape[1])

    @torch.no_grad()
    def _update(self, st: _Step) -> None:
        """Adam on the gradients (decoder rows kept unit-norm), dead-latent bookkeeping, the
        BatchTopK threshold and the step's metrics, all on the device."""
        cfg, B = self.cfg, st.x.shape[1]
        g = self.W_dec.grad  # keep decoder rows on the unit sphere
        assert g is not None
        g.addcmul_(torch.linalg.vecdot(g, self.W_dec)[..., None], self.W_dec, value=-1)
        for group in self.opt.param_groups:
            group["lr"] = recipe.lr_at(cfg, self.steps_total, self.step_i)
        self.opt.step()
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        on = st.z > 0
        fired = on.any(1)  # [S, n]
        self.since_fired += B
        self.since_fired.masked_fill_(fired, 0)
        self.fired_ever |= fired
        if (cfg.architecture == "batchtopk"
                and self.step_i >= recipe.threshold_from(cfg, self.steps_total)):
            pos = st.vals > 0
            least = torch.where(pos, st.vals, torch.inf).amin(1).double()
            self.thr_sum += torch.where(pos.any(1), least, 0.0)
            self.thr_count += pos.any(1)
        x = st.x
        var = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        self._last = {"fvu": st.err.pow(2).sum((1, 2)) / var, "l0": on.sum((1, 2)) / B,
                      "dead": st.dead.float().mean(1), "loss": st.mse + cfg.aux_coef * st.aux,
                      "aux": st.aux}

    def refresh_dead_bound(self) -> None:
        """since_fired was written from outside (tests, benchmarks): start reading a new bound
        now (until it is read, AuxK takes the dense path, which is always exact)."""
        self._bound.snapshot()

    @torch.no_grad()
    def resample(self, x: ChunkRows) -> int:
        """x [S, N, d_in] raw chunk, read SAE by SAE: SAETrainer.resample for each SAE."""
        cfg = self.cfg
        if not cfg.resample_dead or self.step_i >= recipe.decay_start(cfg, self.steps_total):
            return 0
        assert self.input_scale is not None
        total, bound_held = 0, self._bound.valid()
        for i in range(self.S):
            dead = self.since_fired[i] > self.dead_tokens
            n_dead = int(dead.sum())
            if n_dead == 0:
                continue
            xs = x[i].float() * self.input_scale[i]
            if self.dim_scale is not None:
                xs = xs * self.dim_scale[i]
            recipe.resample_sae(xs, dead, sae=self._view(i), moments=recipe.moments(self, i),
                                reconstruct=functools.partial(self._reconstruct, i),
                                batch_size=cfg.batch_size,
                                seed=recipe.resample_seed(self.seeds[i], self.step_i))
            self.since_fired[i][dead] = 0
            total += n_dead
        self._bound.lowered(bound_held)  # resampling only lowers since_fired
        return total

    def _reconstruct(self, i: int, xs: torch.Tensor) -> torch.Tensor:
        """xs [B, d_in] scaled inputs of SAE i -> its reconstruction [B, d_in]."""
        pre = torch.addmm(self.b_enc[i], xs - self.b_dec[i], self.W_enc[i])[None]
        z, _ = code(pre, self.cfg.k, self.cfg.architecture == "batchtopk")
        return z[0] @ self.W_dec[i] + self.b_dec[i]

    def metrics(self) -> list[dict]:
        """The last step's metrics, one dict per SAE (one host sync)."""
        cols = {k: v.detach().float().cpu().tolist() for k, v in self._last.items()}
        return [{k: cols[k][i] for k in cols} for i in range(self.S)]

    def export(self, i: int, metadata: dict) -> SAE:
        return recipe.export_sae(
            self._view(i), self.cfg, input_scale=self.input_scales[i],
            dim_scale=None if self.dim_scale is None else self.dim_scale[i],
            threshold=float(self.thr_sum[i]) / max(1, int(self.thr_count[i])), metadata=metadata)

    # --- checkpoints: one SAETrainer-shaped state per SAE, so either engine can resume ---------
    def state_dict(self, i: int) -> dict:
        opt = self.opt.state_dict()
        per = {j: {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                   for k, v in st.items()} for j, st in opt["state"].items()}
        return recipe.sae_state(
            params=[p[i].detach().clone() for p in self.params],
            opt={"state": per, "param_groups": opt["param_groups"]},
            input_scale=None if self.input_scale is None else self.input_scales[i],
            dim_scale=None if self.dim_scale is None else self.dim_scale[i].clone(),
            step_i=self.step_i, since_fired=self.since_fired[i].clone(),
            fired_ever=self.fired_ever[i].clone(),
            thr=(float(self.thr_sum[i]), int(self.thr_count[i])),
            last=self.metrics()[i] if self._last else {})

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
        self.input_scales = [s["input_scale"] for s in states]
        self.input_scale = (None if self.input_scales[0] is None
                            else torch.tensor(self.input_scales, device=dev))
        dims = [s.get("dim_scale") for s in states]  # all set, or none (one config)
        self.dim_scale = (None if dims[0] is None
                          else torch.stack([d for d in dims if d is not None]).to(dev))
        self.step_i = states[0]["step_i"]
        self.since_fired.copy_(torch.stack([s["since_fired"] for s in states]))
        self.fired_ever.copy_(torch.stack([s["fired_ever"] for s in states]))
        self.thr_sum.copy_(torch.tensor([float(s["thr"][0]) for s in states]))
        self.thr_count.copy_(torch.tensor([int(s["thr"][1]) for s in states]))
        self._bound.snapshot()  # since_fired replaced: a new bound
