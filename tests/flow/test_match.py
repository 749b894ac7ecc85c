"""Blocked exact top-k cosine equals the brute-force answer, for any block sizes."""
import numpy as np
import pytest
import torch

from saeflow.flow.match import top_k_cosine, unit_rows


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


@pytest.mark.parametrize("block_a,block_b", [(7, 11), (64, 1000), (1000, 5)])
def test_rows_and_columns_from_one_pass(block_a, block_b):
    from saeflow.flow.match import top_k_pairs

    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(61, 12, generator=g), torch.randn(45, 12, generator=g)
    m = top_k_pairs(A, B, k=4, cols=True, block_a=block_a, block_b=block_b)
    S = unit_rows(A) @ unit_rows(B).T
    assert torch.equal(m.row_indices, S.topk(4, dim=1).indices)
    assert torch.equal(m.col_indices, S.T.topk(4, dim=1).indices)
    torch.testing.assert_close(m.col_values, S.T.topk(4, dim=1).values)


def test_bf16_ranking_is_rescored_exactly():
    from saeflow.flow.match import top_k_pairs

    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(300, 64, generator=g), torch.randn(500, 64, generator=g)
    exact = top_k_pairs(A, B, k=5, cols=True)
    fast = top_k_pairs(A, B, k=5, cols=True, precision="bf16")
    S = unit_rows(A) @ unit_rows(B).T
    # Whatever bf16 picked is scored in fp32; and with the re-rank margin it picks the same.
    torch.testing.assert_close(fast.row_values, S.gather(1, fast.row_indices))
    assert (fast.row_indices == exact.row_indices).float().mean() > 0.99
    assert (fast.col_indices == exact.col_indices).float().mean() > 0.99


def test_safetensors_rows_stream_from_disk(tmp_path):
    from safetensors.torch import save_file

    from saeflow.errors import MatchError
    from saeflow.flow.match import SafetensorsRows, top_k_pairs

    g = torch.Generator().manual_seed(4)
    W = torch.randn(70, 16, generator=g)
    f = tmp_path / "w.safetensors"
    save_file({"b": torch.zeros(3), "W_dec": W.to(torch.bfloat16)}, str(f))
    rows = SafetensorsRows(f, "W_dec")
    assert (rows.n, rows.d) == (70, 16)
    torch.testing.assert_close(rows.block(10, 25), W[10:25].to(torch.bfloat16).float())
    B = torch.randn(33, 16, generator=g)
    m = top_k_pairs(rows, B, k=3, block_a=8, memory_budget=0)  # forced to stream
    ref = unit_rows(W.to(torch.bfloat16).float()) @ unit_rows(B).T
    assert torch.equal(m.row_indices, ref.topk(3, dim=1).indices)
    data = f.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(MatchError, match="truncated"):
        SafetensorsRows(tmp_path / "cut.safetensors", "W_dec")
    with pytest.raises(MatchError, match="no tensor"):
        SafetensorsRows(f, "W_enc")


@pytest.mark.parametrize("n_a,n_b", [(40, 40), (30, 50), (50, 30)])
def test_permutation_equals_scipy_dense_and_sparse(n_a, n_b):
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from saeflow.flow.match import permutation_match

    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(n_a, 8, generator=g), torch.randn(n_b, 8, generator=g)
    S = (unit_rows(A) @ unit_rows(B).T).double().numpy()
    r, c = linear_sum_assignment(S, maximize=True)
    for dense_limit in (10**9, 0):  # dense solver, then the sparse candidate graph
        rows, cols, cos = permutation_match(A, B, dense_limit=dense_limit, candidates=min(n_a, n_b))
        assert len(rows) == min(n_a, n_b)
        np.testing.assert_allclose(cos.sum(), S[r, c].sum(), rtol=1e-5)
        order = np.argsort(rows)
        assert np.array_equal(rows[order], r) and np.array_equal(cols[order], c)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matching_on_the_test_device_equals_the_cpu(test_device, precision, tmp_path):
    """Blocks read on the host, products and running top-k on the device, results on the CPU:
    the same matches as the CPU path (SAEFLOW_TEST_DEVICE=cuda checks a GPU)."""
    from safetensors.torch import save_file

    from saeflow.flow.match import SafetensorsRows, top_k_pairs

    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(300, 24, generator=g), torch.randn(500, 24, generator=g)
    save_file({"W_dec": B}, str(tmp_path / "b.safetensors"))
    streamed = SafetensorsRows(tmp_path / "b.safetensors", "W_dec")
    ref = top_k_pairs(A, B, k=4, cols=True, block_a=64, block_b=128, precision=precision)
    for b in (B, streamed):  # in memory, and streamed from disk (memory_budget 0)
        m = top_k_pairs(A, b, k=4, cols=True, block_a=64, block_b=128, precision=precision,
                        device=test_device, memory_budget=0 if b is streamed else 512 << 20)
        for got, want in ((m.row_values, ref.row_values), (m.col_values, ref.col_values)):
            assert got.device.type == "cpu"
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.equal(m.row_indices, ref.row_indices)
        assert torch.equal(m.col_indices, ref.col_indices)


def test_columns_null_keeps_a_component_that_every_feature_shares():
    """Two unrelated dictionaries whose rows all carry one large shared dimension (Gemma's
    massive residual dimensions, amplified in standardised SAEs' raw-space rows): the row
    shuffle null scatters that dimension and sets a threshold every real pair clears; the
    columns null keeps it, so its threshold sits above the unrelated pairs' similarities."""
    from saeflow.flow.match import null_top1, top_k_pairs

    g = torch.Generator().manual_seed(0)
    d, n = 64, 2048

    def dictionary():
        W = torch.randn(n, d, generator=g)
        W[:, 0] = 6.0 + torch.randn(n, generator=g)  # the shared component
        return W
    A, B = dictionary(), dictionary()
    real = top_k_pairs(A, B, k=1).row_values[:, 0].numpy()  # no real relation between A and B
    row = float(np.quantile(null_top1(A, B, n=1024, null="shuffle"), 0.99))
    col = float(np.quantile(null_top1(A, B, n=1024, null="columns"), 0.99))
    assert (real >= row).mean() > 0.9  # the row shuffle calls most unrelated pairs related
    assert (real >= col).mean() < 0.05 and col > row
    with pytest.raises(Exception, match="columns"):
        null_top1(A, B, null="rows")


def test_rotation_null_keeps_the_geometry_and_breaks_the_alignment():
    """A rotated copy of a dictionary matched against itself: alignment gone (top-1 far below 1),
    while a real copy scores 1; the same seed gives the same null."""
    from saeflow.flow.match import null_top1, top_k_pairs

    g = torch.Generator().manual_seed(1)
    A = torch.randn(512, 48, generator=g)
    assert torch.allclose(top_k_pairs(A, A, k=1).row_values[:, 0], torch.ones(512), atol=1e-5)
    v = null_top1(A, A, n=256, null="rotation", seed=3)
    assert v.shape == (256,) and float(np.median(v)) < 0.8
    assert np.array_equal(v, null_top1(A, A, n=256, null="rotation", seed=3))
    # `kind`, the former name of `null`, still works
    assert np.array_equal(v, null_top1(A, A, n=256, kind="rotation", seed=3))


def test_dropped_dimensions_leave_the_cosine():
    """drop_dims zeroes coordinates before normalising: a shared massive coordinate no longer
    makes unrelated rows look alike, and the source rows are not written to."""
    from saeflow.flow.match import TensorDirections, top_k_pairs

    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(256, 32, generator=g), torch.randn(256, 32, generator=g)
    A[:, 5] += 40.0
    B[:, 5] += 40.0
    A0 = A.clone()
    raw = top_k_pairs(A, B, k=1).row_values[:, 0]
    kept = top_k_pairs(TensorDirections(A, drop_dims=[5]), TensorDirections(B, drop_dims=[5]),
                       k=1).row_values[:, 0]
    assert float(raw.min()) > 0.9 and float(kept.median()) < 0.6
    assert torch.equal(A, A0)
    A[:, 5], B[:, 5] = 0.0, 0.0
    torch.testing.assert_close(kept, top_k_pairs(A, B, k=1).row_values[:, 0])
