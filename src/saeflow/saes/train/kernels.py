"""The sparse autograd products of the per-SAE engine (sparse.py).

Only the selected pre-activations carry gradient, so the encoder's backward is a sparse product
(CSR, nnz = batch * k) instead of a dense batch x d_sae one; AuxK runs dense on the block of
dead latents (a few % of the width)."""
from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

class GatherPre(torch.autograd.Function):
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

class BlockPre(torch.autograd.Function):
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

def csr_rows(rows: torch.Tensor, B: int) -> torch.Tensor:
    """CSR row pointers [B + 1] of the row indices `rows` [nnz] (sorted)."""
    counts = torch.bincount(rows, minlength=B)
    crow = torch.zeros(B + 1, dtype=torch.long, device=rows.device)
    crow[1:] = counts.cumsum(0)
    return crow

