"""The design of the deactivation experiment without a model: each method's trials for a case."""
import numpy as np

from saeflow.lm.trials import trial_key
from saeflow.steering.validate_config import METHODS, ValidateConfig
from saeflow.steering.validate_design import (
    Candidate,
    CaseSetup,
    Design,
    TokenLayer,
    TrialSet,
    Upstream,
    method_trials,
)

R0, M1 = ("resid_post", 0), ("mlp_out", 1)


def test_each_method_names_its_trials_once_and_controls_avoid_candidates():
    available = set(METHODS) - {"permutation", "top1_pearson"}
    design = Design(cfg=ValidateConfig(), index=None, layers=[1], pearson={}, perm={},
                    available=available, width={1: 8})
    upstream = [Upstream(R0, 0, 2.0, 4.0), Upstream(M1, 1, 1.0, 3.9), Upstream(M1, 2, 0.5, 4.1)]
    trials = TrialSet()
    trials.add(1, ())
    at = TokenLayer(1, upstream, {u.ref: u for u in upstream},
                    [trials.add(1, (u.removal,)) for u in upstream], [], {})
    top1 = Candidate(R0, 0, 0.9)
    st = CaseSetup(case={"text": 0, "token": 3, "layer": 1, "feature": 7}, group=[top1],
                   candidates=[top1, Candidate(M1, 5, 0.5)], named={(R0, 0), (M1, 5)},
                   partner={})
    out = method_trials(design, st, at, trials, np.random.default_rng(0))
    assert [m.method for m in out] == [m for m in METHODS if m in available]
    by = {m.method: m for m in out}
    alone = trial_key(1, [(R0, 0, 2.0)])
    # M_1 feature 5 is not active at the token: every list that names it removes R_0 0 alone.
    for m in ("top1_cosine", "predecessor_group", "top5_cosine"):
        assert by[m].keys == [alone]
    assert by["random_top5"].keys in ([alone], [])  # one of the two, at random
    assert by["exhaustive_top5"].keys == [alone]
    assert by["exhaustive"].keys == at.singles
    assert len(trials) == 4  # the unedited row and the three singles: nothing new
    ctl = by["control_matched"]
    (removed,) = ctl.keys[0].removed
    assert (removed.slot, removed.feature) in {(M1, 1), (M1, 2)}  # active, no candidate
    assert 1 / 1.25 <= ctl.control_norm_ratio <= 1.25 and ctl.matched == "0/resid_post/0"
    assert by["control_group"].matched == "0/resid_post/0"
    assert by["exhaustive_control"].keys == [] and by["exhaustive_control"].matched_by_key == {}
