"""`saeflow stats`: co-activation statistics and the analyses built on them."""
from __future__ import annotations

from saeflow.cli.common import (
    add_json,
    add_pass_arguments,
    model_and_pack,
    print_json,
    scale_from_args,
)
from saeflow.cli.options import (
    add_config_options,
    add_signature_options,
    command,
    config_from_args,
    signature_kwargs,
)

ANALYSIS_OPTIONS = {
    "pass_threshold": "Pearson at or above which a feature passes through to the next layer",
    "gate_threshold": "sufficiency/necessity that makes an AND/OR gate",
    "gate_min_count": "co-activations a gate needs",
    "gate_max_up_density": "ignore upstream features active on more than this share of tokens",
    "gate_min_up_count": "ignore upstream features active fewer times than this",
    "community_floor": "edges at or above this weight join the community graph",
    "resolution": "community resolution (higher: smaller communities)",
    "method": "community detection algorithm",
}


def cmd_stats(args) -> int:
    from saeflow.evolution.analyses import write_evolution_outputs
    from saeflow.evolution.stats import StatsConfig, run_stats

    scale = scale_from_args(args)
    model, pack = model_and_pack(args, "stats")
    st = run_stats(pack, model, args.out, config_from_args(StatsConfig, args), force=args.force,
                   scale=scale)
    summary = write_evolution_outputs(args.out, st, pack,
                                      **signature_kwargs(args, ANALYSIS_OPTIONS))
    if args.json:
        print_json(summary)
        return 0
    m = st.manifest
    print(f"statistics of {len(m['pairs'])} SAE pairs over {m['tokens']} tokens "
          f"({m['seconds'] / 60:.1f} min) -> {st.root}")
    print(f"  pass-through at Pearson >= {args.pass_threshold}:")
    for r in summary["pass_through"]:
        print(f"    {r['position']:<11} {r['layer']:>2}->{r['next_layer']:<2}  pass "
              f"{r['pass_through_pct']:5.1f}%  disappear {r['disappearing_pct']:5.1f}%  "
              f"appear {r['appearing_pct']:5.1f}%")
    print(f"  gates: {summary['gates']['AND']} AND, {summary['gates']['OR']} OR "
          f"(threshold {args.gate_threshold}); see gates.json")
    print(f"  communities: {summary['communities']['n']}")
    for r in summary.get("agreement", []):
        print(f"    layer {r['layer']:>2}: top-1 cosine = top-1 Pearson for "
              f"{100 * r['top1_agreement']:.1f}%; Spearman {r['spearman_cosine_pearson']:.3f}")
    return 0


def _stats_options(st) -> None:
    from saeflow.evolution.analyses import write_evolution_outputs
    from saeflow.evolution.config import StatsConfig

    add_pass_arguments(st, StatsConfig, "stats")
    g = st.add_argument_group("statistics")
    add_config_options(g, StatsConfig, only=["pairs", "positions", "active", "top_k", "floor",
                                             "checkpoint_every_s"])
    g = st.add_argument_group("analyses")
    add_signature_options(g, write_evolution_outputs, ANALYSIS_OPTIONS,
                          flags={"method": ["--community-method"]})
    st.add_argument("--force", action="store_true")
    add_json(st)
    st.set_defaults(func=cmd_stats)


def register(sub) -> None:
    command(sub, "stats", "co-activation statistics, pass-through, gates, communities",
            _stats_options)
