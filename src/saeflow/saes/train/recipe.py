"""The SAE recipe both engines follow (TopK / BatchTopK, after Gao et al. 2024 and Bussmann et
al. 2024), and the `Engine` protocol the family loop drives them through:

  - inputs standardised per dimension (input_norm "dim"): each dimension divided by its standard
    deviation on the first chunk, capped at dim_cap x the median one (Gemma's massive residual
    dimensions); folded exactly into W_enc, W_dec and b_dec on export, and recorded (not to be
    applied again) as metadata.saeflow.dim_scale in cfg.json. input_norm "scalar" is the older
    single factor with E||x||^2 = d_in (recorded as input_scale, folded on save);
  - b_dec initialised at the geometric median of the first chunk;
  - W_dec rows kept at unit norm (gradient parallel to each row removed, then renormalised);
  - AuxK loss: the top-k_aux pre-activations among dead latents reconstruct the residual;
  - dead latents optionally resampled between chunks, before the lr decay;
  - BatchTopK exports a JumpReLU threshold: the mean of the smallest selected value over the
    last steps (the lr decay).

An engine holds S SAEs (S = 1 for the sparse one) and takes their inputs stacked, x [S, N, d_in].
One SAE's checkpoint state has the same layout in both engines, so either resumes the other's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from saeflow.saes.sae import SAE
from saeflow.saes.train.config import TrainConfig


class ChunkRows(Protocol):
    """Rows [S, N, d_in] that are read SAE by SAE: a tensor, or a lazily gathered chunk (so
    init and resampling never hold a second copy of the whole chunk)."""

    @property
    def shape(self) -> torch.Size: ...

    @property
    def device(self) -> torch.device: ...

    def __getitem__(self, i, /) -> torch.Tensor: ...


class Engine(Protocol):
    """S SAEs in training, as the family loop sees them (x is always [S, ..., d_in])."""

    engine: str  # "sparse" | "stacked", recorded in the pack's provenance
    step_i: int

    @property
    def initialised(self) -> bool:
        """Whether the input scales are fixed (by the first chunk, or a checkpoint)."""
        ...

    def init_from(self, x: ChunkRows) -> None:
        """x [S, N, d_in], the first chunk: input scales, b_dec at the geometric median."""
        ...

    def resample(self, x: ChunkRows) -> int:
        """x [S, N, d_in] raw chunk: re-initialise dead latents; returns how many."""
        ...

    def step(self, x: torch.Tensor) -> object:
        """x [S, B, d_in] raw activations: one optimiser step."""
        ...

    def metrics(self) -> list[dict]:
        """The last step's metrics, one dict per SAE."""
        ...

    def export(self, *, i: int, metadata: dict) -> SAE:
        """SAE i in raw input space (scales folded in)."""
        ...

    def state_dict(self, i: int) -> dict:
        """SAE i's checkpoint state (`sae_state`)."""
        ...

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resume all S SAEs from their states, in order."""
        ...


@dataclass
class SAEView:
    """One SAE's parameters, as views into an engine's tensors."""

    W_enc: torch.Tensor  # [d_in, n]
    W_dec: torch.Tensor  # [n, d_in]
    b_enc: torch.Tensor  # [n]
    b_dec: torch.Tensor  # [d_in]


# --- schedule and defaults ------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, steps_total: int, step: int) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last decay_frac of the steps."""
    T = steps_total
    warm, decay = max(1, int(cfg.warmup_frac * T)), int(cfg.decay_frac * T)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if decay and step >= T - decay:
        return cfg.lr * max(0.0, (T - step) / decay)
    return cfg.lr


def threshold_from(cfg: TrainConfig, steps_total: int) -> int:
    """First step whose BatchTopK threshold counts towards the exported one: the last
    decay_frac (at least 10%) of the steps, where the parameters have settled (over the whole
    run the threshold kept early, larger values: too few active latents on held-out data)."""
    return min(steps_total - 1, int(steps_total * (1 - max(cfg.decay_frac, 0.1))))


def decay_start(cfg: TrainConfig, steps_total: int) -> int:
    """First step of the linear lr decay."""
    return steps_total - int(cfg.decay_frac * steps_total)


def aux_k_of(cfg: TrainConfig, d_in: int) -> int:
    """Dead latents in the AuxK loss."""
    return cfg.aux_k or max(1, d_in // 2)


def dead_tokens_of(cfg: TrainConfig) -> int:
    """Tokens without firing after which a latent counts as dead."""
    return cfg.dead_tokens or max(cfg.batch_size * 4, cfg.tokens // 10)


def init_decoder(n: int, d_in: int, seed: int) -> torch.Tensor:
    """Unit-norm random decoder rows [n, d_in], the same for a seed on any device or engine."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, d_in, generator=g)
    return W_dec / W_dec.norm(dim=1, keepdim=True)


# --- input scales and the geometric median --------------------------------------------------------
def dim_scale(x: torch.Tensor, cap: float = 0.0) -> torch.Tensor:
    """Per-dimension input scale [d] of x [N, d] (float32).

    1 / standard deviation, with the sd floored at 1% of the median one (no blow-up of empty
    dimensions) and, for cap c > 0, capped at c x the median one."""
    sd = x.float().std(0)
    med = float(sd.median()) + 1e-12
    return 1.0 / sd.clamp(min=med * 1e-2, max=med * cap if cap > 0 else float("inf"))


@dataclass
class InputScales:
    """The scales fixed by the first chunk, for S SAEs."""

    input_scale: list[float]  # [S] single factors (1.0 with input_norm "dim")
    dim_scale: torch.Tensor | None  # [S, d_in] with input_norm "dim"
    median: torch.Tensor  # [S, d_in] geometric median of the scaled inputs: b_dec's start


@torch.no_grad()
def init_scales(x: torch.Tensor, cfg: TrainConfig, ratio_in_float32: bool) -> InputScales:
    """x [S, N, d_in] float32, the first chunk. `ratio_in_float32`: the sparse engine divides
    d_in / E||x||^2 in float32, the stacked one in float64 (kept so packs stay bit-identical)."""
    d_in = x.shape[2]
    dims = None
    if cfg.input_norm == "dim":
        scales = [1.0] * x.shape[0]
        dims = torch.stack([dim_scale(xi, cfg.dim_cap) for xi in x])
    else:
        mean_sq = x.pow(2).sum(2).mean(1).clamp_min(1e-12)  # [S]
        scales = [math.sqrt(d_in / m) if ratio_in_float32 else math.sqrt(d_in / float(m))
                  for m in mean_sq]
    xs = x * torch.tensor(scales, device=x.device)[:, None, None]
    if dims is not None:
        xs = xs * dims[:, None, :]
    return InputScales(scales, dims, geometric_median(xs))


def geometric_median(xs: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Weiszfeld's geometric median [S, d] of each of S point sets xs [S, N, d]."""
    med = xs.mean(1)
    for _ in range(iterations):
        w = 1.0 / (xs - med[:, None]).norm(dim=2).clamp_min(1e-6)  # [S, N]
        med = (w[:, :, None] * xs).sum(1) / w.sum(1, keepdim=True)
    return med


# --- resampling dead latents ----------------------------------------------------------------------
@torch.no_grad()
def resample_sae(xs: torch.Tensor, dead: torch.Tensor, *, sae: SAEView, moments: dict,
                 reconstruct: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                 seed: int) -> None:
    """Re-initialise SAE `sae`'s latents `dead` [n] (bool) from its scaled chunk xs [N, d_in].

    Each takes the centred direction of an input drawn with probability proportional to its
    squared reconstruction error (Anthropic, "Towards monosemanticity", 2023); `seed` makes
    the draw exact on resume."""
    n_dead = int(dead.sum())
    err = torch.cat([(reconstruct(xb) - xb).pow(2).sum(1) for xb in xs.split(batch_size)])  # [N]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(err.cpu().double() + 1e-12, n_dead, replacement=n_dead > len(err),
                            generator=gen).to(xs.device)
    reset_latents(dead, xs[idx] - sae.b_dec, sae, moments)


def resample_seed(seed: int, step_i: int) -> int:
    return seed * 1_000_003 + step_i


@torch.no_grad()
def reset_latents(dead: torch.Tensor, d: torch.Tensor, sae: SAEView, moments: dict) -> None:
    """Latents `dead` [n] (bool) take unit decoder rows along d [n_dead, d_in], encoder columns
    0.2 x the mean live column norm along the same direction, bias 0 and fresh Adam moments.
    moments: {"W_enc" | "W_dec" | "b_enc": Adam's state tensors shaped like that parameter}
    (views, zeroed in place)."""
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    live = ~dead
    norm = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
    sae.W_dec[dead] = d
    sae.W_enc[:, dead] = d.t() * 0.2 * norm
    sae.b_enc[dead] = 0.0
    for name, sl in (("W_dec", (dead,)), ("W_enc", (slice(None), dead)), ("b_enc", (dead,))):
        for v in moments[name]:
            v[sl] = 0.0


def moments(trainer, i: int | None = None) -> dict:
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


# --- export -----------------------------------------------------------------------------------------
def fold_dim_scale(W_enc, W_dec, b_dec, v):
    """Exact fold of a per-dimension input scale v [d]: the SAE that encodes v*x and decodes
    back with /v equals one on raw x with W_enc' = diag(v) W_enc, W_dec' = W_dec diag(1/v),
    b_dec' = b_dec / v (b_dec is subtracted from the input and added to the output)."""
    return v[:, None] * W_enc, W_dec / v[None, :], b_dec / v


DIM_SCALE_NOTE = ("training inputs were x * dim_scale per dimension (1 / min(sd, dim_cap x the "
                  "median sd), sd on the first chunk); already folded exactly into W_enc, W_dec "
                  "and b_dec: informational, do not apply it again")


def dim_scale_metadata(v: torch.Tensor, cap: float) -> dict:
    """What an export records of its per-dimension scale v [d] (written to cfg.json under
    metadata.saeflow; loaders ignore it). Each float is the shortest decimal that reads back
    as the same float32."""
    return {"input_norm": "dim (folded)", "dim_cap": cap,
            "dim_scale": [float(str(x)) for x in v.float().cpu().numpy()],
            "dim_scale_note": DIM_SCALE_NOTE}


def export_sae(sae: SAEView, cfg: TrainConfig, *, input_scale: float,
               dim_scale: torch.Tensor | None, threshold: float, metadata: dict) -> SAE:
    """One trained SAE in raw input space: the per-dimension scale folded into the weights and
    recorded in the metadata; BatchTopK's mean threshold as its JumpReLU threshold."""
    W_enc = sae.W_enc.detach().float().cpu()
    W_dec = sae.W_dec.detach().float().cpu()
    b_dec = sae.b_dec.detach().float().cpu()
    if dim_scale is not None:
        v = dim_scale.float().cpu()
        W_enc, W_dec, b_dec = fold_dim_scale(W_enc, W_dec, b_dec, v)
        metadata = {**metadata, **dim_scale_metadata(v, cfg.dim_cap)}
    n = W_dec.shape[0]
    thresholds = torch.full((n,), threshold) if cfg.architecture == "batchtopk" else None
    return SAE(W_enc=W_enc.contiguous(), W_dec=W_dec, b_enc=sae.b_enc.detach().float().cpu(),
               b_dec=b_dec, architecture=cfg.architecture, threshold=thresholds, k=cfg.k,
               apply_b_dec_to_input=True, input_scale=input_scale,
               batchtopk_inference="jumprelu", metadata=metadata)


# --- checkpoint state ---------------------------------------------------------------------------------
def sae_state(*, params: list[torch.Tensor], opt: dict, input_scale: float | None,
              dim_scale: torch.Tensor | None, step_i: int, since_fired: torch.Tensor,
              fired_ever: torch.Tensor, thr: tuple[float, int], last: dict) -> dict:
    """One SAE's checkpoint state, the same in both engines: params [W_enc [d_in, n], W_dec,
    b_enc, b_dec] and Adam's state dict shaped alike, counters, the threshold sums."""
    return {"params": params, "opt": opt, "input_scale": input_scale, "dim_scale": dim_scale,
            "step_i": step_i, "since_fired": since_fired, "fired_ever": fired_ever, "thr": thr,
            "last": last}
