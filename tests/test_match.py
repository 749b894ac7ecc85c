"""Blocked exact top-k cosine equals the brute-force answer, for any block sizes."""
import pytest
import torch

from saeflow.match import top_k_cosine, unit_rows


@pytest.mark.parametrize("block_a,block_b", [(7, 11), (1, 1000), (1000, 5), (64, 64)])
def test_blocked_topk_equals_brute_force(block_a, block_b):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(53, 16, generator=g) * torch.rand(53, 1, generator=g)  # unequal norms
    B = torch.randn(97, 16, generator=g)
    v, i = top_k_cosine(A, B, k=5, block_a=block_a, block_b=block_b)
    sims = unit_rows(A) @ unit_rows(B).T
    rv, ri = sims.topk(5, dim=1)
    torch.testing.assert_close(v, rv)
    assert torch.equal(i, ri)


def test_self_match_finds_itself_and_errors():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(40, 8, generator=g)
    v, i = top_k_cosine(A, A, k=1, block_b=7)
    assert torch.equal(i[:, 0], torch.arange(40))
    torch.testing.assert_close(v[:, 0], torch.ones(40))
    with pytest.raises(ValueError, match="different widths"):
        top_k_cosine(A, torch.randn(5, 9))
    with pytest.raises(ValueError, match="k must be"):
        top_k_cosine(A, A, k=41)
