"""One-token trials over a KV cache (lm/trials.py): the early-layer shortcut and the keys."""
import pytest
import torch

from saeflow.lm import trials
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.lm.trials import Removal, TrialKey, first_block, path_error, run_token, trial_key
from saeflow.saes.sae import random_sae


def test_trial_keys_sort_their_removals_and_equal_plain_tuples():
    r0, m2 = ("resid_post", 0), ("mlp_out", 2)
    key = trial_key(2, [(r0, 5, 2.0), (m2, 4, 0.5)])
    assert key == (2, ((m2, 4, 0.5), (r0, 5, 2.0)))  # sorted by slot: mlp_out before resid_post
    assert hash(key) == hash((2, ((m2, 4, 0.5), (r0, 5, 2.0))))
    assert isinstance(key, TrialKey) and all(isinstance(r, Removal) for r in key.removed)
    assert key.removed[1].feature == 5 and key.layer == 2
    # resid_post j changes block j + 1, an edit inside block j changes block j.
    assert first_block([key], 2) == 1
    assert first_block([trial_key(3, [(("resid_post", 1), 0, 1.0)])], 3) == 2
    assert first_block([trial_key(3, ())], 3) == 3


def test_path_error_is_relative_to_the_clean_pre_activations():
    pre = torch.tensor([2.0, -4.0])
    rows = {1: (None, torch.stack([pre + torch.tensor([0.0, 0.4]), pre * 9]))}
    assert path_error(rows, {1: pre}) == pytest.approx(0.1)  # row 0 only: the unedited row


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "llama", "qwen3", "gpt2"])
def test_skipping_early_layers_matches_the_full_forward(tiny_models, family, monkeypatch):
    """A trial at R_L runs only the blocks its removals change, from the clean residual stream;
    the result equals the forward through every layer over the KV cache."""
    starts = []
    skipping = trials.skipping_layers
    monkeypatch.setattr(trials, "skipping_layers",
                        lambda model, start, h, n: starts.append(start) or skipping(model, start,
                                                                                    h, n))

    model = tiny_models[family]
    d = model.d_model
    saes = {("resid_post", L): random_sae(d, 24, "relu", seed=L) for L in range(3)}
    saes |= {(p, 2): random_sae(d, 24, "relu", seed=9 + i)
             for i, p in enumerate(("mlp_out", "attn_out"))}
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    rm, ra, r0, r1 = ("mlp_out", 2), ("attn_out", 2), ("resid_post", 0), ("resid_post", 1)
    sets = {trial_key(2, ()): 0, trial_key(2, ((r1, 3, 0.7),)): 1,
            trial_key(2, ((ra, 1, 0.2), (rm, 4, 0.5))): 2, trial_key(1, ()): 3,
            trial_key(1, ((r0, 2, 1.0),)): 4, trial_key(2, ((r0, 5, 2.0),)): 5}
    pts = {j: HookPoint("resid_post", j) for j in range(3)}
    with torch.inference_mode(), Hooks(model, capture=list(pts.values())) as h:
        model.hf(input_ids=ids)
    for t in (0, 7):
        clean = {j: h.activations[pt][0, t] for j, pt in pts.items()}
        starts.clear()
        full = run_token(model, saes, ids, t, sets, 2)
        assert set(starts) == {0}
        starts.clear()
        fast = run_token(model, saes, ids, t, sets, 2, clean_h=clean)
        # R_1's chunk starts at block 1; R_2's chunks: (unedited, R_1 removal) at block 2,
        # (A_2 + M_2 removal, R_0 removal) at block 1.
        assert sorted(starts) == [1, 1, 2]
        for L in (1, 2):
            for a, b in zip(full[L], fast[L]):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        # The unedited rows are the clean forward's.
        pre = saes[("resid_post", 2)].pre_acts(h.activations[pts[2]][0, t])
        assert torch.allclose(fast[2][1][0], pre, atol=1e-5, rtol=1e-4)
