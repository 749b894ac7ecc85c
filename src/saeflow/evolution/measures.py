"""The measures of a pair of features from their running sums (see evolution/stats.py), and the
dense d_up x d_down reference they are checked against."""
from __future__ import annotations

import numpy as np
import torch


def measures(c, p, n_i, n_j, s_i, s_j, q_i, q_j, N) -> dict[str, np.ndarray]:
    """All measures from the sums (vectorised; float64)."""
    c, p = np.asarray(c, float), np.asarray(p, float)
    n_i, n_j = np.asarray(n_i, float), np.asarray(n_j, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_i = N * q_i - s_i ** 2
        var_j = N * q_j - s_j ** 2
        pearson = (N * p - s_i * s_j) / np.sqrt(var_i * var_j)
        pearson = np.where((var_i > 0) & (var_j > 0), pearson, 0.0)
        jaccard = c / (n_i + n_j - c)
        suff = np.where(n_i > 0, c / n_i, 0.0)
        nec = np.where(n_j > 0, c / n_j, 0.0)
        mi = _binary_mi(c, n_i, n_j, N)
    return {"pearson": pearson, "jaccard": np.nan_to_num(jaccard), "sufficiency": suff,
            "necessity": nec, "mutual_info": mi}


def _binary_mi(c, n_i, n_j, N) -> np.ndarray:
    """Mutual information (nats) of two binary variables from their 2 x 2 counts."""
    cells = [c, n_i - c, n_j - c, N - n_i - n_j + c]
    margins = [(n_i, n_j), (n_i, N - n_j), (N - n_i, n_j), (N - n_i, N - n_j)]
    mi = np.zeros_like(c, dtype=float)
    for cell, (a, b) in zip(cells, margins):
        with np.errstate(divide="ignore", invalid="ignore"):
            term = (cell / N) * np.log(cell * N / (a * b))
        mi += np.where(cell > 0, term, 0.0)
    return mi


def dense_reference(z_up: torch.Tensor, z_down: torch.Tensor, act_up=None, act_down=None
                    ) -> dict[str, np.ndarray]:
    """The original method: full d_up x d_down matrices by einsum (tests and benchmarks)."""
    act_up = (z_up > 0) if act_up is None else act_up
    act_down = (z_down > 0) if act_down is None else act_down
    zu, zd = z_up.double(), z_down.double()
    bu, bd = act_up.double(), act_down.double()
    N = zu.shape[0]
    C = torch.einsum("ti,tj->ij", bu, bd).numpy()
    P = torch.einsum("ti,tj->ij", zu, zd).numpy()
    n_i, n_j = bu.sum(0).numpy()[:, None], bd.sum(0).numpy()[None, :]
    s_i, s_j = zu.sum(0).numpy()[:, None], zd.sum(0).numpy()[None, :]
    q_i, q_j = (zu * zu).sum(0).numpy()[:, None], (zd * zd).sum(0).numpy()[None, :]
    out = measures(C, P, n_i, n_j, s_i, s_j, q_i, q_j, N)
    out["count"] = C
    return out
