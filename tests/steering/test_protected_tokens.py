"""Steering never edits BOS, EOS, padding or any other special token (issue 25, item 5).

The SAEs never saw these positions in training; editing them (a feature fires at z ~ 57 on BOS)
wrecks the model. Each test spies on the edits inside real forwards: at protected positions an
edit must hand back its input bit for bit, elsewhere it must change it."""
import pytest
import torch

import saeflow.steering.generate as gen_mod
from saeflow.errors import PlanError
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae
from saeflow.steering.generate import SamplingConfig, generate, sample
from saeflow.steering.plans import (
    CallScope,
    Intervention,
    SteeringPlan,
    plan_edits,
    special_token_ids,
)

PAD, EOS, BOS = 0, 1, 2  # the tiny tokenizer's special ids (tests/fixtures.py)
SLOTS = [("resid_post", 0), ("resid_post", 1), ("mlp_out", 1), ("resid_post", 2)]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [(p, L, random_sae(d, 32, "relu", seed=40 + i)) for i, (p, L) in enumerate(SLOTS)]
    pack = save_pack(saes, tmp_path_factory.mktemp("protect") / "pack", model_name="tiny",
                     d_model=d, n_layers=model.n_layers)
    typical = {(p, L): torch.full((s.d_sae,), 2.0) for p, L, s in saes}
    return model, pack, typical


def _text_ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False).input_ids


def _ids_with_specials(model) -> torch.Tensor:
    """[1, seq]: BOS, text, EOS, BOS (a separator, as in packed corpus rows), more text."""
    row = [BOS, *_text_ids(model, "hello world"), EOS, BOS, *_text_ids(model, "the cat sat")]
    return torch.tensor([row], device=model.device)


def _clean(model, ids, points, mask=None) -> dict:
    with torch.inference_mode(), Hooks(model, capture=points) as h:
        model.hf(input_ids=ids, attention_mask=mask)
    return h.activations


def _plan(model, pack, mode: str, layers, ids, mask=None) -> SteeringPlan:
    """A plan over the slots at `layers`; rescale picks, per slot, the feature most active on BOS
    (so that an edit of BOS would be large), with r = -4."""
    slots = [s for s in SLOTS if s[1] in layers]
    if mode == "add":
        return SteeringPlan("add", [Intervention(L, p, 3, 5.0) for p, L in slots])
    acts = _clean(model, ids, [HookPoint(p, L) for p, L in slots], mask)
    ordinary = ~torch.isin(ids, torch.tensor([PAD, EOS, BOS], device=ids.device))
    ivs = []
    for p, L in slots:
        z = pack.sae(p, L, device=model.device).encode(acts[HookPoint(p, L)])  # [b, seq, d_sae]
        on_bos = z[ids == BOS].min(0).values  # active on every BOS ...
        score = torch.where(on_bos > 0, (z[ordinary] > 0).sum(0) + on_bos / 1e3, -1.0)
        ivs.append(Intervention(L, p, int(score.argmax()), -4.0))  # ... and on most tokens
    return SteeringPlan("rescale", ivs)


def _spy(edits: dict, log: list) -> dict:
    """The same edits, each logging (point, input, output) of every call."""
    def wrap(point, fn):
        def edit(act):
            before = act.clone()
            out = fn(act)
            log.append((point, before, before if out is None else out.clone()))
            return out
        return edit
    return {pt: wrap(pt, fn) for pt, fn in edits.items()}


def _steer(model, pack, typical, plan, ids, mask=None, protect=True):
    """One forward with the plan's edits; -> (captured activations, spy log)."""
    log: list = []
    scope = CallScope.for_model(model)
    if protect:
        scope.set_inputs(ids, mask)
    edits = _spy(plan_edits(plan, pack, scope, typical, device=model.device), log)
    with torch.inference_mode(), scope, Hooks(model, capture=list(edits), edits=edits) as h:
        model.hf(input_ids=ids, attention_mask=mask)
    return h.activations, log


def _check_log(log, protected: torch.Tensor, every: bool) -> int:
    """Every edit left the protected rows bit-identical; with `every`, it changed all the other
    rows (additive edits; a rescale only moves tokens where its feature is active).
    -> how many ordinary rows the edits changed."""
    assert log
    moved_total = 0
    for point, before, after in log:
        assert torch.equal(after[protected], before[protected]), f"{point} edited a special token"
        moved = (after != before).any(-1)[~protected]  # over the ordinary rows
        assert moved.all() or not every, f"{point} left an ordinary token unedited"
        moved_total += int(moved.sum())
    return moved_total


def test_special_token_ids_come_from_the_tokenizer(tiny_models):
    import copy

    from tokenizers import AddedToken

    tok = tiny_models["gemma3"].tokenizer
    assert special_token_ids(tok) == [PAD, EOS, BOS, 3]  # + <unk>
    # Gemma's <start_of_turn>/<end_of_turn> are added tokens marked special that are not in
    # all_special_ids (checked on the real Gemma 3 tokenizer): they are protected too.
    tok = copy.deepcopy(tok)
    tok.add_tokens([AddedToken("<start_of_turn>", special=True), AddedToken("plain")])
    turn, plain = tok.convert_tokens_to_ids(["<start_of_turn>", "plain"])
    assert turn not in tok.all_special_ids
    assert turn in special_token_ids(tok) and plain not in special_token_ids(tok)


@pytest.mark.parametrize("mode", ["add", "rescale"])
@pytest.mark.parametrize("layers", [(1,), (0, 1, 2)], ids=["single", "cumulative"])
def test_edits_never_touch_bos_or_special_tokens(setup, mode, layers):
    model, pack, typical = setup
    ids = _ids_with_specials(model)
    protected = torch.isin(ids, torch.tensor([PAD, EOS, BOS], device=model.device))
    plan = _plan(model, pack, mode, layers, ids)
    clean = _clean(model, ids, [HookPoint(p, L) for p, L in plan.slots()])
    steered, log = _steer(model, pack, typical, plan, ids)
    assert _check_log(log, protected, every=mode == "add") > 0
    for pt, act in steered.items():
        # BOS at position 0 sees only itself: bit-identical at every edited layer, downstream too
        assert torch.equal(act[:, 0], clean[pt][:, 0]), f"{pt}: the BOS row changed"
        assert not torch.equal(act[~protected], clean[pt][~protected]), f"{pt}: no change"
    first = min(plan.slots(), key=lambda s: (s[1], s[0] != "mlp_out"))  # the earliest edit
    pt = HookPoint(*first)
    assert torch.equal(steered[pt][protected], clean[pt][protected])  # EOS and separator too
    # Without ids the scope protects nothing: these same edits do move BOS (the test can fail).
    unprotected, _ = _steer(model, pack, typical, plan, ids, protect=False)
    assert not torch.equal(unprotected[pt][:, 0], clean[pt][:, 0])


@pytest.mark.parametrize("mode", ["add", "rescale"])
def test_left_padded_batch_keeps_padding_and_bos_unedited(setup, mode):
    model, pack, typical = setup
    long = [BOS, *_text_ids(model, "hello world, the cat sat")]
    short = [BOS, *_text_ids(model, "the cat")]
    n = len(long) - len(short)
    assert n > 0
    ids = torch.tensor([long, [PAD] * n + short], device=model.device)
    mask = torch.ones_like(ids)
    mask[1, :n] = 0
    protected = (ids == BOS) | (mask == 0)
    plan = _plan(model, pack, mode, (0, 1, 2), ids, mask)
    clean = _clean(model, ids, [HookPoint(p, L) for p, L in plan.slots()], mask)
    steered, log = _steer(model, pack, typical, plan, ids, mask)
    assert _check_log(log, protected, every=mode == "add") > 0
    pt = HookPoint("resid_post", 0)  # the first edit: nothing upstream of it was edited
    assert torch.equal(steered[pt][protected], clean[pt][protected])
    for pt, act in steered.items():  # each row's BOS sees only itself (padding is masked out)
        assert torch.equal(act[0, 0], clean[pt][0, 0]) and torch.equal(act[1, n], clean[pt][1, n])
    # A pad id is protected even where the attention mask was not given.
    scope = CallScope.for_model(model)
    scope.set_inputs(ids)
    assert torch.equal(scope.protected, protected)


def test_scope_refuses_ids_of_another_forward(setup):
    model, pack, typical = setup
    ids = _ids_with_specials(model)
    plan = _plan(model, pack, "add", (1,), ids)
    scope = CallScope.for_model(model)
    scope.set_inputs(ids[:, :3])
    edits = plan_edits(plan, pack, scope, typical, device=model.device)
    with pytest.raises(PlanError, match="set_inputs before every forward"):
        with torch.inference_mode(), scope, Hooks(model, edits=edits):
            model.hf(input_ids=ids)


@pytest.mark.parametrize("mode", ["add", "rescale"])
def test_generation_never_edits_special_tokens(setup, monkeypatch, mode):
    model, pack, typical = setup
    ids = _ids_with_specials(model)
    plan = _plan(model, pack, mode, (0, 1, 2), ids)
    log: list = []
    real = gen_mod.plan_edits
    monkeypatch.setattr(gen_mod, "plan_edits",
                        lambda *a, **k: _spy(real(*a, **k), log))
    cfg = SamplingConfig(max_new_tokens=5, n=2, temperature=0)

    # Through generate(): the prompt forward starts with the tokenizer's BOS.
    generate(model, "hello world", cfg, plan, pack, typical)
    prompt = [(pt, b, a) for pt, b, a in log if b.shape[1] > 1]
    assert prompt and all(b.shape[0] == 2 for _, b, _ in prompt)
    bos_only = torch.zeros(prompt[0][1].shape[:2], dtype=torch.bool, device=model.device)
    bos_only[:, 0] = True
    assert _check_log(prompt, bos_only, every=mode == "add") > 0

    # Through sample() with separators inside the prompt; then each cached step's token.
    log.clear()
    out = sample(model, ids, cfg, lambda scope: gen_mod.plan_edits(plan, pack, scope, typical,
                                                                   device=model.device))
    n_points = len(plan.slots())
    steps = [log[i:i + n_points] for i in range(0, len(log), n_points)]
    assert len(steps) == out.shape[1]
    protected = torch.isin(ids, torch.tensor([PAD, EOS, BOS], device=model.device)).expand(2, -1)
    assert _check_log(steps[0], protected, every=mode == "add") > 0
    fed = out[:, :-1].to(model.device)  # the token each later step ran on
    for k, step in enumerate(steps[1:]):
        special = torch.isin(fed[:, k:k + 1], torch.tensor([PAD, EOS, BOS], device=model.device))
        _check_log(step, special, every=mode == "add")

    # The KV-cache loop equals steered full re-computation with the same protection.
    seq = ids.expand(2, -1)
    scope = CallScope.for_model(model)
    edits = real(plan, pack, scope, typical, device=model.device)
    with torch.inference_mode(), scope, Hooks(model, edits=edits):
        for _ in range(out.shape[1]):
            scope.set_inputs(seq)
            nxt = model.hf(input_ids=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(seq[:, ids.shape[1]:].cpu(), out)
