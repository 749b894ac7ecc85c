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


# --- the tiled engine against the former per-block loop (issue 29) ---------------------------
def _former_top_k_pairs(A, B, k, block_a, block_b, precision="fp32", margin=4):
    """The per-block loop top_k_pairs ran before the tiled engine (on the CPU): A normalised per
    block, B once; merges by top-k over [running, block's best]; column top-k over sims.T."""
    def merge(bv, bi, v, i):
        cv, ci = torch.cat([bv, v], 1), torch.cat([bi, i], 1)
        tv, pos = cv.topk(bv.shape[1], dim=1)
        return tv, ci.gather(1, pos)
    low = precision == "bf16"
    kc, kc_col = (min(k + margin, len(B)), min(k + margin, len(A))) if low else (k, k)
    UB = unit_rows(B)
    row_v, row_i = torch.empty(len(A), kc), torch.empty(len(A), kc, dtype=torch.long)
    col_v, col_i = torch.full((len(B), kc_col), float("-inf")), torch.zeros((len(B), kc_col),
                                                                            dtype=torch.long)
    for a0 in range(0, len(A), block_a):
        a = unit_rows(A[a0:a0 + block_a])
        a = a.bfloat16() if low else a
        bv, bi = torch.full((len(a), kc), float("-inf")), torch.zeros((len(a), kc), dtype=torch.long)
        for b0 in range(0, len(B), block_b):
            b = UB[b0:b0 + block_b]
            sims = (a @ b.to(a.dtype).T).float()
            v, i = sims.topk(min(kc, sims.shape[1]), dim=1)
            bv, bi = merge(bv, bi, v, i + b0)
            v, i = sims.T.topk(min(kc_col, sims.shape[0]), dim=1)
            col_v[b0:b0 + len(b)], col_i[b0:b0 + len(b)] = merge(
                col_v[b0:b0 + len(b)], col_i[b0:b0 + len(b)], v, i + a0)
        row_v[a0:a0 + len(a)], row_i[a0:a0 + len(a)] = bv, bi
    if low:  # exact fp32 re-scoring of the candidates: X normalised per block of 1024
        def rerank(X, Y, cand, held):  # Y held: one candidate column at a time; else einsum
            out_v, out_i = torch.empty(len(X), k), torch.empty(len(X), k, dtype=torch.long)
            UY = unit_rows(Y)
            for a0 in range(0, len(X), 1024):
                a, c = unit_rows(X[a0:a0 + 1024]), cand[a0:a0 + 1024]
                if held:
                    s = torch.stack([(a * UY.index_select(0, c[:, j])).sum(1)
                                     for j in range(c.shape[1])], dim=1)
                else:
                    s = torch.einsum("ad,akd->ak", a, UY[c])
                v, pos = s.topk(k, dim=1)
                out_v[a0:a0 + len(a)], out_i[a0:a0 + len(a)] = v, c.gather(1, pos)
            return out_v, out_i
        row_v, row_i = rerank(A, B, row_i, held=True)  # B is held (materialised), A streamed
        col_v, col_i = rerank(B, A, col_i, held=False)
    return row_v, row_i, col_v, col_i


def _tied_dictionaries():
    """Dictionaries with exact ties: repeated rows (in A and in B) and small-integer rows."""
    g = torch.Generator().manual_seed(7)
    B0 = torch.randn(40, 8, generator=g)
    B = torch.cat([B0, B0, B0[:10]])[torch.randperm(90, generator=g)]
    A = torch.cat([B0[:20], B0[:20], torch.randn(13, 8, generator=g)])
    X = torch.randint(-1, 2, (61, 8), generator=g).float()
    Y = torch.randint(-1, 2, (77, 8), generator=g).float()
    X[3], Y[5] = 0.0, 0.0  # zero rows: every cosine with them is 0
    return [(A, B), (X, Y)]


@pytest.mark.parametrize("block_a,block_b", [(1024, 4096), (7, 11), (5, 3), (64, 13)])
def test_fp32_results_and_ties_are_those_of_the_former_loop(block_a, block_b):
    """Values, indices and how exact ties fall: bit for bit what the former loop gave."""
    from saeflow.flow.match import top_k_pairs

    for A, B in _tied_dictionaries():
        m = top_k_pairs(A, B, k=4, cols=True, block_a=block_a, block_b=block_b)
        want = _former_top_k_pairs(A, B, 4, block_a, block_b)
        for got, ref in zip((m.row_values, m.row_indices, m.col_values, m.col_indices), want):
            assert torch.equal(got, ref)


@pytest.mark.parametrize("block_a,block_b", [(1024, 4096), (37, 50)])
def test_bf16_candidates_and_rescores_match_the_former_loop(block_a, block_b):
    """bf16 ranking on a CPU picks the candidates it picked before and re-scores them as
    before: the same values and indices. The GPU's batched gather and product (forced here:
    per_column off) differs from them by rounding at most."""
    from saeflow.flow import match, tiles

    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(150, 48, generator=g), torch.randn(230, 48, generator=g)
    A[7], B[9] = B[3], A[5]  # exact cosines of 1
    m = match.top_k_pairs(A, B, k=5, cols=True, block_a=block_a, block_b=block_b,
                          precision="bf16")
    want = _former_top_k_pairs(A, B, 5, block_a, block_b, precision="bf16")
    for got, ref in zip((m.row_values, m.row_indices, m.col_values, m.col_indices), want):
        assert torch.equal(got, ref)
    bmm = lambda *a, per_column=False, **kw: tiles.rescore(*a, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(match, "rescore", bmm)
        b = match.top_k_pairs(A, B, k=5, cols=True, block_a=block_a, block_b=block_b,
                              precision="bf16")
    assert torch.equal(b.row_indices, want[1]) and torch.equal(b.col_indices, want[3])
    torch.testing.assert_close(b.row_values, want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.col_values, want[2], atol=1e-6, rtol=0)


def test_large_tiles_and_held_rows_equal_small_streamed_blocks():
    """Both dictionaries held as unit rows, tiles larger than either, against small blocks with
    A normalised block by block: the same matches."""
    from saeflow.flow.match import TensorDirections, top_k_pairs

    g = torch.Generator().manual_seed(9)
    A, B = torch.randn(300, 32, generator=g), torch.randn(260, 32, generator=g)
    held = TensorDirections(unit_rows(A), normalized=True)
    for precision in ("fp32", "bf16"):
        big = top_k_pairs(held, B, k=3, cols=True, block_a=8192, block_b=32768, precision=precision)
        small = top_k_pairs(A, B, k=3, cols=True, block_a=16, block_b=40, precision=precision)
        assert torch.equal(big.row_indices, small.row_indices)
        assert torch.equal(big.col_indices, small.col_indices)
        torch.testing.assert_close(big.row_values, small.row_values, atol=1e-6, rtol=0)
        torch.testing.assert_close(big.col_values, small.col_values, atol=1e-6, rtol=0)


def test_materialize_block_by_block_equals_all_at_once():
    """The way rows are put on a GPU (normalised there, block by block), run on the CPU: the
    same unit rows, with projection, dropped dimensions and row scales."""
    from saeflow.flow.match import TensorDirections

    g = torch.Generator().manual_seed(10)
    W, P = torch.randn(50, 12, generator=g), torch.randn(12, 16, generator=g)
    for kw in ({}, {"project": P, "drop_dims": [1, 3], "row_scale": torch.rand(50, generator=g)}):
        D = TensorDirections(W, **kw)
        whole = D.materialize(1 << 30)
        blocks = D.materialize(1 << 30, device="cpu", block=7)
        assert blocks.normalized and blocks.W.shape == (50, D.d)
        torch.testing.assert_close(blocks.W, whole.W, atol=1e-6, rtol=0)
        assert D.materialize(0) is D  # over the budget: streamed
    held = TensorDirections(unit_rows(W), normalized=True)
    assert torch.equal(held.materialize(1 << 30, device="cpu", block=7).W, held.W)


def _former_null(A, B, n, null, seed):
    """The null directions as null_top1 drew them before (A of at most 8192 rows), matched
    by the former loop."""
    g = torch.Generator().manual_seed(seed)
    U, d = unit_rows(A), A.shape[1]
    if null == "gaussian":
        X = torch.randn(min(n, len(A)), d, generator=g)
    else:
        rows = torch.randperm(len(A), generator=g)[:max(n, 8192) if null == "columns" else n]
        X = U[rows.sort().values]
        if null == "shuffle":
            X = X.gather(1, torch.argsort(torch.rand(X.shape, generator=g), dim=1))
        elif null == "columns":
            X = X.gather(0, torch.randint(0, len(X), (min(n, len(A)), d), generator=g))
        else:
            Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            X = X @ (Q * torch.sign(torch.diagonal(R))).float()
    return _former_top_k_pairs(X, B, 1, 1024, 4096)[0][:, 0].numpy()


@pytest.mark.parametrize("ahead", [0, 2])
def test_nulls_are_the_former_ones_memoised_and_drawn_ahead(ahead, monkeypatch):
    """Every null model gives the values it gave before, whether its draws are reused (a
    layer's predecessors share a seed) or were started ahead on background threads (as on a
    GPU; forced here on the CPU)."""
    from saeflow.flow import match

    monkeypatch.setattr(match, "draws_ahead", lambda dev: ahead)
    g = torch.Generator().manual_seed(11)
    A, B = torch.randn(300, 24, generator=g), torch.randn(200, 24, generator=g)
    for null in ("columns", "shuffle", "rotation", "gaussian"):
        for seed in (0, 1, 0, 2):
            got = match.null_top1(A, B, n=64, null=null, seed=seed)
            assert np.array_equal(got, _former_null(A, B, 64, null, seed)), (null, seed)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_layer_on_the_test_device_equals_the_cpu(test_device, precision):
    """compute_layer with its dictionaries held on the matching device (live subsets, the
    columns and rotation nulls, the one-to-one method): the CPU's results, up to rounding.
    Trivial on a CPU; SAEFLOW_TEST_DEVICE=cuda checks a GPU."""
    from saeflow.flow.compute import compute_layer
    from saeflow.flow.config import FlowConfig
    from saeflow.flow.inputs import LayerSlots
    from saeflow.flow.match import TensorDirections
    from saeflow.ids import Slot

    g = torch.Generator().manual_seed(12)
    slots = [Slot("resid_post", 1), Slot("resid_post", 0), Slot("mlp_out", 1)]
    W = {s: torch.randn(400, 32, generator=g) for s in slots}
    live = {slots[0]: (torch.rand(400, generator=g) > 0.1).numpy()}
    plan = LayerSlots(1, slots[0], {"res": slots[1], "mlp": slots[2], "attn": None})
    for method, null in (("decoder", "columns"), ("decoder", "rotation"), ("permutation", "columns")):
        out = {}
        for dev in ("cpu", test_device):
            cfg = FlowConfig(k=3, precision=precision, method=method, null=null, null_samples=128,
                             device=dev, block_a=64, block_b=96)
            out[dev] = compute_layer(None, plan, cfg, live=live,
                                     directions=lambda s, drop=None: TensorDirections(W[s]))
        for key, want in out["cpu"].items():
            got = out[test_device][key]
            if key.endswith("_i"):
                assert np.array_equal(got, want), key
            else:
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=key)


def test_the_tile_scan_never_waits_for_the_gpu(test_device):
    """Tiles, running merges and the fp32 re-scoring with both dictionaries held on a GPU queue
    their work without a host sync (torch's sync debug mode turns one into an error). Runs with
    SAEFLOW_TEST_DEVICE=cuda; skipped on a CPU."""
    if not test_device.startswith("cuda"):
        pytest.skip("a GPU check")
    from saeflow.flow.match import TensorDirections
    from saeflow.flow.tiles import Rows, rescore, scan

    g = torch.Generator().manual_seed(13)
    A, B = unit_rows(torch.randn(700, 64, generator=g)), unit_rows(torch.randn(900, 64, generator=g))
    held = TensorDirections(A.to(test_device), normalized=True)
    assert held.materialize(1 << 30, device="cuda") is held  # "cuda" is where it is held
    ra = Rows(700, 64, torch.device(test_device), torch.bfloat16, resident=A.to(test_device))
    rb = Rows(900, 64, torch.device(test_device), torch.bfloat16, resident=B.to(test_device))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, row_i, _, col_i = scan(ra, rb, 9, 9, True, 256, 512)
        rv, ri = rescore(ra, rb, row_i, 5, lambda idx: rb.W[idx].float(), 300)
        cv, ci = rescore(rb, ra, col_i, 5, lambda idx: ra.W[idx].float(), 300)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    S = A @ B.T
    assert torch.equal(ri.cpu(), S.topk(5, dim=1).indices)
    assert torch.equal(ci.cpu(), S.T.topk(5, dim=1).indices)
