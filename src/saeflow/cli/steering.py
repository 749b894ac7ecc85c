"""`saeflow steer|validate|steer-sweep`: interventions."""
from __future__ import annotations

import math
from pathlib import Path

from saeflow.checks import flag
from saeflow.cli.common import add_device, load_model_and_pack, model_spec
from saeflow.cli.features import add_llm_options, explainer_from_args
from saeflow.cli.options import (
    add_config_options,
    add_overrides,
    add_signature_options,
    command,
    config_from_args,
    given_overrides,
    signature_kwargs,
)
from saeflow.errors import PlanError, SaeflowError, UsageError

PLAN_OPTIONS = {
    "graph_mode": "the feature alone (seed), or its flow graph at --layer (single), at layers "
                  "<= --layer (cumulative; the whole graph without --layer), or all (span)",
    "kind": "add: h + s * typical activation * direction; rescale: activation * r",
    "strength": "s (add) or r (rescale)",
    "layer": "the graph layer steered (single / cumulative)",
    "schedule": "how the strength changes over generated tokens",
    "alpha": "exponential schedule rate",
    "tokens": "comma-separated token positions (0 = BOS); default every token",
    "t_res": "residual chain threshold of the graph",
    "t_mod": "MLP/attention link threshold of the graph",
    "positions": "which graph nodes to steer, e.g. resid_post,mlp_out,attn_out",
}
PLAN_FLAGS = {"graph_mode": ["--mode"], "tokens": ["--at-tokens"],
              "positions": ["--graph-positions"]}
SWEEP_OVERRIDES = ["themes", "modes", "strengths", "max_layers", "kind", "seeds_per_theme",
                   "prompt", "n", "max_new_tokens", "temperature", "top_p", "seeds",
                   "classifier_docs"]


def add_pack_and_model(p, pack_default: str | None = "embedded") -> None:
    p.add_argument("--pack", default=pack_default, help="a pack path, or 'embedded'")
    p.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    add_device(p)


def load_plan_file(path: str):
    """The plan in `path`; a plan the plans module cannot read (a number where a list goes, a
    layer of 1e400) is a PlanError naming the file, never a traceback."""
    from saeflow.steering.plans import SteeringPlan

    try:
        return SteeringPlan.load(path)
    except SaeflowError:
        raise
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as e:
        raise PlanError(f"{path} is not a valid steering plan ({type(e).__name__}: {e}); see "
                        f"`saeflow steer --save-plan` for the format") from None


def cmd_steer(args) -> int:
    from saeflow.steering.generate import SamplingConfig, steer
    from saeflow.steering.plans import build_plan
    from saeflow.store import write_json_atomic

    if bool(args.plan) == bool(args.feature):
        raise UsageError("give either --plan PLAN.json or --feature LAYER/POSITION/INDEX")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty; give the text to continue")
    for name in ("strength", "alpha", "t_res", "t_mod"):  # plan numbers, checked before loading
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            raise UsageError(f"{flag(name)} must be a finite number, not {getattr(args, name)}")
    model_spec(args.pack, args.model, "steer")
    cfg = config_from_args(SamplingConfig, args)
    cfg.check(args.force)  # before loading anything
    plan = load_plan_file(args.plan) if args.plan else None  # a bad plan fails before the model
    model, pack = load_model_and_pack(args, "steer")
    if plan is None:
        plan = build_plan(pack, feature=args.feature, run=args.run, model=model,
                          **signature_kwargs(args, PLAN_OPTIONS))
    if args.save_plan:
        plan.check(pack, force=args.force)
        plan.save(args.save_plan)
    res = steer(model, pack, plan, args.prompt, cfg, run=args.run, force=args.force)
    if args.json:
        write_json_atomic(Path(args.json), res)
    print(f"plan: {plan.description or plan.mode} ({len(plan.interventions)} interventions: "
          f"{', '.join(i.id for i in plan.interventions[:8])}"
          f"{' ...' if len(plan.interventions) > 8 else ''})")
    for i, (a, b) in enumerate(zip(res["default"], res["steered"])):
        print(f"--- sample {i}")
        print(f"  default: {args.prompt}{a}")
        print(f"  steered: {args.prompt}{b}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_validate(args) -> int:
    from saeflow.steering.validate import (
        VALIDATE_DIR,
        ValidateConfig,
        breakdown_markdown,
        paired_markdown,
        rank_rule_markdown,
        run_validation,
        table_markdown,
        write_r_sweep,
    )

    cfg = config_from_args(ValidateConfig, args)
    cfg.check()  # bad settings fail before the model loads
    model, pack = load_model_and_pack(args, "validate")
    for L in cfg.layers or []:
        model.check_layer(L)
    summary = run_validation(pack, model, args.run, cfg)
    print(f"deactivation on {summary['texts']} {summary['split']} texts, layers "
          f"{summary['layers']}, {summary['targets']} cases (targets chosen "
          f"{cfg.target_choice}ly; {summary['seconds']:.0f} s):")
    print(table_markdown(summary))
    ci = summary["ci_target"]
    if ci["halfwidth_asked"] is not None:
        print(f"CI half-width asked {100 * ci['halfwidth_asked']:.0f} points: "
              f"{'met' if ci['met'] else 'NOT met (raise --max-texts)'} "
              f"({', '.join(f'{m} {100 * v:.1f}' for m, v in ci['halfwidths'].items())})")
    print("each method minus its null on the same cases (points; change in units of z_old):")
    print(paired_markdown(summary))
    print("success by the target's activation rank (0 = most active at the token), both rules:")
    print(rank_rule_markdown(summary))
    print("success by the cosine of the removed feature to the target:")
    print(breakdown_markdown(summary, "by_similarity", title="cosine"))
    print("top-1 cosine by empirical group (is removing one predecessor enough?):")
    for g, r in summary["by_group_top1"].items():
        print(f"  {g:<22} {r['cases']:>5} cases  success {100 * r['success_rate']:5.1f}%")
    dead = summary.get("dead_latents", {})
    if dead.get("slots"):
        print(f"candidate lists leave out latents that fired < {dead['min_count']} times in "
              f"{dead['tokens']} tokens ({dead['source']}); --keep-dead keeps them")
    if cfg.r_graphs > 0:
        df = write_r_sweep(pack, model, args.run, cfg)
        print("r sweep (relative change of LM loss, mean over graphs):")
        for r, g in df.groupby("r"):
            print(f"  r = {r:5.2f}: {g.relative_change.mean():+.4f}")
    print(f"wrote {Path(args.run) / VALIDATE_DIR}")
    return 0


def _seed_features(text: str | None) -> dict:
    """'religion=6/resid_post/12+7/resid_post/3,arts=...' -> {theme: id or [ids]}."""
    seeds: dict = {}
    for item in (text or "").split(","):
        if item.strip():
            th, _, fids = item.partition("=")
            ids = [f.strip() for f in fids.split("+") if f.strip()]
            seeds[th.strip()] = ids[0] if len(ids) == 1 else ids
    return seeds


def cmd_steer_sweep(args) -> int:
    from saeflow.steering.sweep import run_sweep, sweep_profile

    model_spec(args.pack, args.model, "steer-sweep")
    cfg = sweep_profile("paper" if args.paper else args.profile,
                        seed_features=_seed_features(args.seed_features) or None,
                        **given_overrides(args, SWEEP_OVERRIDES))
    cfg.check()
    judge_cfg = explainer_from_args(args, model=args.model or "") if args.url else None
    model, pack = load_model_and_pack(args, "steer-sweep")
    s = run_sweep(model, pack, args.run, cfg, judge_cfg=judge_cfg)
    score = s["score"]
    print(f"steering sweep, profile {s['profile']} ({s['seconds'] / 60:.1f} min); topic "
          f"classifier held-out accuracy {100 * s['classifier']['held_out_accuracy']:.1f}%")
    for th, info in s["seeds"].items():
        print(f"  {th:<12} {len(info['seeds'])} seed(s) from {info['seed']} "
              f"({info.get('label') or 'no label'}), graph layers {info['graph_layers']}")
    print(f"best setting per theme and mode ({score.replace('_', ' ')}, 95% CI):")
    for r in s["best"]:
        print(f"  {r['theme']:<12} {r['mode']:<15} layer {r['layer']:>3} strength "
              f"{r['strength']:>5g}: {r[score]:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  "
              f"concept {r['concept']:.2f} coherence {r['coherence']:.2f}")
    for key, label in (("cumulative_vs_single_at_equal_strength", "cumulative - single"),
                       ("cumulative_norm_vs_single_at_equal_strength",
                        "cumulative at single's norm - single")):
        c = s.get(key) or {}
        if "difference" in c:
            per = ", ".join(f"{k}: {v['difference']:+.3f}" for k, v in c["by_strength"].items())
            print(f"{label}, same settings: {c['difference']:+.3f} [{c['ci_low']:+.3f}, "
                  f"{c['ci_high']:+.3f}] over {c['pairs']} paired texts; by strength {per}")
    print(f"wrote {Path(args.run) / cfg.out_dir}")
    return 0


def _steer_options(sr) -> None:
    from saeflow.steering.config import DEFAULT_PROMPT, STEER_SAMPLING
    from saeflow.steering.plans import build_plan

    add_pack_and_model(sr)
    sr.add_argument("--plan", default=None, help="a steering plan (JSON)")
    sr.add_argument("--feature", default=None, help="LAYER/POSITION/INDEX to steer")
    sr.add_argument("--run", default=None, help="RUN with the flow (and index) of this pack")
    g = sr.add_argument_group("the plan (with --feature)")
    add_signature_options(g, build_plan, PLAN_OPTIONS, flags=PLAN_FLAGS)
    g = sr.add_argument_group("sampling")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"(default: {DEFAULT_PROMPT!r})")
    add_config_options(g, STEER_SAMPLING)
    sr.add_argument("--force", action="store_true", help="lift the bounds on strength, n, ...")
    sr.add_argument("--save-plan", default=None, help="write the plan used as JSON")
    sr.add_argument("--json", default=None, help="write prompt, plan and completions as JSON")
    sr.set_defaults(func=cmd_steer)


def _validate_options(va) -> None:
    from saeflow.steering.validate_config import ValidateConfig

    va.add_argument("run", help="RUN directory (its flow and stats are used; writes RUN/validate)")
    add_pack_and_model(va)
    add_config_options(va, ValidateConfig,
                       flags={"target_choice": ["--targets"], "ci_halfwidth": ["--ci"]})
    va.set_defaults(func=cmd_validate)


def _steer_sweep_options(sw) -> None:
    from saeflow.steering.config import SWEEP_PROFILES, SweepConfig

    sw.add_argument("run", help="RUN with the flow and feature index of the pack (writes RUN/sweep)")
    add_pack_and_model(sw)
    sw.add_argument("--profile", default="ours", choices=list(SWEEP_PROFILES),
                    help="ours: activation by adding (RUN/sweep); paper: the paper's "
                         "deactivation by rescale (RUN/sweep-paper); the options below "
                         "override a profile's settings")
    sw.add_argument("--paper", action="store_true", help="the same as --profile paper")
    g = sw.add_argument_group("overrides of the profile")
    add_overrides(g, SweepConfig, SWEEP_OVERRIDES)
    g.add_argument("--seed-features", default=None,
                   help="theme=LAYER/POSITION/INDEX[+...],... instead of searching the index")
    add_llm_options(sw, judge=True)
    sw.set_defaults(func=cmd_steer_sweep)


def register(sub) -> None:
    command(sub, "steer", "default vs steered completions, side by side", _steer_options)
    command(sub, "validate", "deactivation experiments: do predecessors matter?",
            _validate_options)
    command(sub, "steer-sweep", "steering grid: modes x layers x strengths x themes",
            _steer_sweep_options)
