"""One sparse autoencoder: encode/decode for JumpReLU, TopK, BatchTopK, GroupMax and ReLU, folding, directions.

Weights follow the SAELens convention:
    W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], threshold [d_sae]

    encode(x) = act((x * input_scale - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)
    decode(z) = (z @ W_dec + b_dec) / input_scale

GroupMax (sparsify's `activation: groupmax`): the d_sae latents are k contiguous groups of
d_sae/k; in each group only the largest ReLU'd pre-activation survives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from saeflow.errors import ConfigError, SAEShapeError

ARCHITECTURES = ("jumprelu", "topk", "batchtopk", "relu", "groupmax")


@dataclass
class SAE:
    W_enc: torch.Tensor  # [d_in, d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in]
    architecture: str = "relu"
    threshold: torch.Tensor | None = None  # [d_sae]; JumpReLU, or BatchTopK's exported threshold
    k: int | None = None  # TopK / BatchTopK
    apply_b_dec_to_input: bool = False
    input_scale: float = 1.0  # inputs are multiplied by this before encoding
    # BatchTopK at inference: "jumprelu" (needs threshold, no batch dependence) or "topk".
    batchtopk_inference: str = "jumprelu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        if self.W_enc.ndim != 2 or self.W_dec.ndim != 2:
            raise SAEShapeError("W_enc and W_dec must be 2-D ([d_in, d_sae] and [d_sae, d_in])")
        d_in, d_sae = self.W_enc.shape
        expect = {"W_dec": (self.W_dec, (d_sae, d_in)), "b_enc": (self.b_enc, (d_sae,)),
                  "b_dec": (self.b_dec, (d_in,))}
        if self.threshold is not None:
            expect["threshold"] = (self.threshold, (d_sae,))
        for name, (t, shape) in expect.items():
            if tuple(t.shape) != shape:
                raise SAEShapeError(
                    f"{name} has shape {tuple(t.shape)}, expected {shape} for W_enc {(d_in, d_sae)}"
                )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise ConfigError("a JumpReLU SAE needs a threshold tensor [d_sae]")
        if self.architecture == "topk" and not self.k:
            raise ConfigError("a TopK SAE needs k")
        if self.k is not None and not 0 < self.k <= d_sae:
            raise ConfigError(f"k={self.k} is not within 1..d_sae={d_sae}; the config's k is wrong")
        if self.architecture == "groupmax" and (not self.k or d_sae % self.k):
            raise ConfigError(f"a GroupMax SAE needs k groups that divide d_sae {d_sae}; "
                             f"got k={self.k}")
        if self.architecture == "batchtopk":
            if self.batchtopk_inference not in ("jumprelu", "topk"):
                raise ConfigError("batchtopk_inference must be 'jumprelu' or 'topk'")
            if self.batchtopk_inference == "jumprelu" and self.threshold is None:
                raise ConfigError("BatchTopK inference as JumpReLU needs the exported threshold")
            if self.batchtopk_inference == "topk" and not self.k:
                raise ConfigError("BatchTopK inference as TopK needs k")
        if not (self.input_scale > 0):
            raise ConfigError(f"input_scale must be > 0, got {self.input_scale}")

    # --- shape facts ----------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def fold_decoder_norm_into_selection(self) -> "SAE":
        """Exact form of SAELens's `rescale_acts_by_decoder_norm=True` (TopK/BatchTopK).

        There, pre-activations are multiplied by ||W_dec[i]|| before the selection and
        activations divided by it before decoding. Scaling W_enc and b_enc by the norms and
        W_dec by their inverse gives the same outputs with a plain selection (SAELens's own
        fold_W_dec_norm); the activations come out in the rescaled units, as SAELens returns.
        """
        # In float32 at least, then cast: a bf16 product rounds W_enc * n a second time and
        # changes which latents win the selection on a large share of tokens.
        work = torch.promote_types(self.dtype, torch.float32)
        W_enc, W_dec, b_enc = (t.to(work) for t in (self.W_enc, self.W_dec, self.b_enc))
        n = W_dec.norm(dim=-1).clamp_min(1e-8)  # [d_sae]
        return self._replace(W_enc=(W_enc * n).to(self.dtype), b_enc=(b_enc * n).to(self.dtype),
                             W_dec=(W_dec / n[:, None]).to(self.dtype),
                             metadata={**self.metadata, "rescale_acts_by_decoder_norm": "folded"})

    def nonfinite(self) -> list[str]:
        """'W_enc: 3 NaN/Inf values' for every tensor that holds any (empty: all finite)."""
        out = []
        for name, t in self.tensors().items():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out.append(f"{name}: {bad} NaN/Inf value{'s' if bad > 1 else ''}")
        return out

    @property
    def activation(self) -> str:
        """The inference activation actually applied: jumprelu, topk, groupmax or relu."""
        if self.architecture == "batchtopk":
            return self.batchtopk_inference
        return self.architecture

    def same_dtype(self) -> "SAE":
        """All tensors in W_enc's dtype (files may mix float64 weights with float32 biases)."""
        if all(t.dtype == self.dtype for t in self.tensors().values()):
            return self
        return self.to(dtype=self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def to(self, device=None, dtype=None) -> "SAE":
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()}
        return self._replace(**moved)

    def _replace(self, **changes) -> "SAE":
        fields: dict[str, Any] = dict(W_enc=self.W_enc, W_dec=self.W_dec, b_enc=self.b_enc, b_dec=self.b_dec,
                      architecture=self.architecture, threshold=self.threshold, k=self.k,
                      apply_b_dec_to_input=self.apply_b_dec_to_input,
                      input_scale=self.input_scale, batchtopk_inference=self.batchtopk_inference,
                      metadata=dict(self.metadata))
        fields.update(changes)
        return SAE(**fields)

    # --- forward --------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> pre-activations [..., d_sae]."""
        if x.shape[-1] != self.d_in:
            raise SAEShapeError(f"input has width {x.shape[-1]} but this SAE has d_in {self.d_in}")
        x = x.to(self.W_enc.dtype)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            assert self.threshold is not None  # __post_init__ requires it for JumpReLU
            return torch.relu(pre) * (pre > self.threshold)
        if act == "groupmax":
            groups = torch.relu(pre).unflatten(-1, (self.k, -1))  # [..., k, d_sae/k]
            vals, idx = groups.max(dim=-1, keepdim=True)
            return torch.zeros_like(groups).scatter_(-1, idx, vals).flatten(-2)
        assert self.k is not None  # groupmax and topk SAEs carry k (__post_init__)
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> feature activations [..., d_sae]."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d_sae] -> reconstruction [..., d_in], in the input's units."""
        out = z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return out / self.input_scale if self.input_scale != 1.0 else out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- geometry -------------------------------------------------------------------------
    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.float().norm(dim=-1)  # [d_sae]

    def unit_directions(self) -> torch.Tensor:
        """Unit-norm decoder rows [d_sae, d_in] in float32; dead all-zero rows stay zero."""
        W = self.W_dec.float()
        return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def fold(self) -> "SAE":
        """Return an equivalent SAE whose activations are in folded units (output unchanged).

        - JumpReLU (and BatchTopK exported as JumpReLU): threshold folding, as in SAE Match:
          W_enc' = W_enc / θ, b_enc' = b_enc / θ, W_dec' = θ W_dec, θ' = 1.
        - ReLU / TopK / GroupMax: decoder-norm folding: W_enc' = W_enc ‖W_dec‖, b_enc' = b_enc ‖W_dec‖,
          W_dec' = W_dec / ‖W_dec‖ (unit rows). For TopK this is exact only when decoder norms
          are equal (as in saeflow and sparsify training, which keep them at 1); otherwise the
          top-k selection could change, so it is refused.
        Also folds input_scale into the weights so the result has input_scale 1.
        """
        sae = self.fold_input_scale()
        if sae.activation == "jumprelu":
            assert sae.threshold is not None
            theta = sae.threshold.float()
            if (theta <= 0).any():
                raise ConfigError("threshold folding needs all thresholds > 0")
            t = theta.to(sae.dtype)
            return sae._replace(W_enc=sae.W_enc / t, b_enc=sae.b_enc / t,
                                W_dec=sae.W_dec * t[:, None], threshold=torch.ones_like(t),
                                metadata={**sae.metadata, "folded": "threshold"})
        norms = sae.decoder_norms().clamp_min(1e-12)
        if sae.activation in ("topk", "groupmax") and (norms.max() - norms.min()) > 1e-3 * norms.max():
            raise ConfigError(f"decoder-norm folding of a {sae.activation} SAE with unequal decoder "
                             "norms would "
                             "change which features are selected; use unit_directions() instead")
        n = norms.to(sae.dtype)
        return sae._replace(W_enc=sae.W_enc * n, b_enc=sae.b_enc * n, W_dec=sae.W_dec / n[:, None],
                            metadata={**sae.metadata, "folded": "decoder_norm"})

    def fold_input_scale(self) -> "SAE":
        """Fold input_scale s into the weights (exact): W_enc*s, W_dec/s, b_dec/s."""
        s = self.input_scale
        if s == 1.0:
            return self
        return self._replace(W_enc=self.W_enc * s, W_dec=self.W_dec / s, b_dec=self.b_dec / s,
                             input_scale=1.0,
                             metadata={**self.metadata, "input_scale_folded": s})


def random_sae(d_in: int, d_sae: int, architecture: str = "jumprelu", k: int | None = None,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> SAE:
    """A random SAE with sensible scales (for fixtures, benchmarks and null models)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
    b_enc = 0.1 * torch.randn(d_sae, generator=g)
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    threshold = None
    if architecture in ("jumprelu", "batchtopk"):
        threshold = 0.05 + 0.2 * torch.rand(d_sae, generator=g)
    sae = SAE(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, architecture=architecture,
              threshold=threshold, k=k or (8 if architecture in ("topk", "batchtopk") else None),
              apply_b_dec_to_input=architecture != "jumprelu")
    return sae.to(dtype=dtype)
