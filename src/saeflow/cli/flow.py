"""`saeflow flow|trace|match`: the data-free feature flow."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from saeflow.cli.common import (
    add_json,
    add_scale,
    add_selectors,
    open_pack_from_args,
    optional_model,
    print_json,
    scale_from_args,
)
from saeflow.cli.options import (
    add_config_options,
    add_signature_options,
    command,
    config_from_args,
    parse_layers_arg,
)
from saeflow.configs import TOKENS, setting


@dataclass
class TraceConfig:
    """The settings of one feature's flow graph (saeflow.flow.graphs.trace's defaults)."""
    t_res: float = setting(0.5, "residual chain threshold")
    t_mod: float | None = setting(None, "MLP/attention link threshold")
    mod_k: int = setting(1, "MLP/attention predecessors per node")
    direction: Literal["both", "backward", "forward"] = setting(
        "both", "follow predecessors, successors, or both")


def _thresholds_arg(args) -> dict | None:
    out = {}
    if args.thresholds:
        out = json.loads(Path(args.thresholds).read_text())
    for kind in ("res", "mlp", "attn"):
        v = getattr(args, f"high_{kind}")
        if v is not None:
            out[kind] = v
    return out or None


def cmd_flow(args) -> int:
    from saeflow.features.liveness import firing_pass, liveness_from_index
    from saeflow.flow.compute import run_flow
    from saeflow.flow.config import FlowConfig
    from saeflow.flow.plots import write_flow_plots

    scale = scale_from_args(args)
    model = optional_model(args.model)
    pack = open_pack_from_args(args, model=model)
    n_layers = pack.n_layers or (max(pack.layers()) + 1)
    for layer in args.layers or []:
        if not 0 <= layer < n_layers:
            from saeflow.errors import FlowError

            raise FlowError(f"layer {layer} out of range: the pack covers layers 0..{n_layers - 1}")
    cfg = config_from_args(FlowConfig, args)
    liveness = None
    if not args.keep_dead:
        liveness = liveness_from_index(args.out, pack)
        if liveness is None and model is not None:
            liveness = firing_pass(pack, model, args.tokens, progress=True)
    run = run_flow(pack, args.out, cfg, layers=args.layers, thresholds=_thresholds_arg(args),
                   model=model, t_res=args.t_res, force=args.force, liveness=liveness,
                   scale=scale)
    if not args.no_plots:
        write_flow_plots(run, run.root / "plots", t_res=args.t_res)
    counts = run.class_counts()
    if args.json:
        print_json({"run": str(run.root), "manifest": run.manifest, "class_counts": counts,
                    "thresholds": run.thresholds["layers"]})
        return 0
    m = run.manifest
    how = "reused cached matches" if m.get("reused_cache") else "computed"
    print(f"flow of {m['pack']['root']} ({how}, {m['seconds']:.1f}s) -> {run.root}")
    print(f"  {'layer':>5}  {'translated':>10} {'processed':>10} {'newborn':>10} "
          f"{'unexplained':>11}   thresholds res / mlp / attn")
    for L, c in counts.items():
        n = max(sum(c.values()), 1)
        t = run.thresholds["layers"][str(L)]
        ts = " / ".join(f"{t[k]['value']:.3f}" if k in t else "-" for k in ("res", "mlp", "attn"))
        print(f"  {L:>5}  " + " ".join(f"{100 * c[k] / n:>9.1f}%" for k in
                                       ("translated", "processed", "newborn")) +
              f" {100 * c['unexplained'] / n:>10.1f}%   {ts}")
    for L, how in m["attention_mapping"].items():
        if "attn_z" in how:
            print(f"  attention at layer {L}: {how}")
            break
    dead = m.get("dead_latents", {})
    if dead.get("slots"):
        left = sum(v["excluded"] for v in dead["slots"].values())
        total = sum(v["n"] for v in dead["slots"].values())
        how = "never fired" if dead["min_count"] == 1 else \
            f"fired fewer than {dead['min_count']} times"
        print(f"  left out: {left} of {total} latents {how} in {dead['tokens']} tokens "
              f"({dead['source']}); --keep-dead keeps them")
    elif not args.keep_dead:
        print("  dead latents are counted: no firing counts (build an index in this RUN first, "
              "or pass --model for a firing pass)")
    print("  files: predecessors.parquet, successors.parquet, thresholds.json, plots/")
    return 0


def cmd_trace(args) -> int:
    from saeflow.features.tables import add_labels
    from saeflow.flow.graphs import node_link, trace, write_graph
    from saeflow.flow.run import open_flow

    run = open_flow(args.run)
    if args.pack:
        from saeflow.saes.recipes import open_pack

        run.check_pack(open_pack(args.pack), name=args.pack)
    G = trace(run, args.feature, **asdict(config_from_args(TraceConfig, args)))
    add_labels(G, args.run)  # from RUN's feature index, when it has one
    out = Path(args.out) if args.out else run.root / "traces" / args.feature.replace("/", "_")
    formats = ["json", "graphml", *args.picture.split(",")]
    written = write_graph(G, out, formats=[f for f in formats if f])
    if args.json:
        print_json(node_link(G))
        return 0
    layers = sorted({d["layer"] for _, d in G.nodes(data=True)})
    print(f"flow graph of {args.feature}: {G.number_of_nodes()} nodes, {G.number_of_edges()} "
          f"links, layers {layers[0]}..{layers[-1]} (t_res={args.t_res}, t_mod={args.t_mod})")
    for u, v, d in sorted(G.edges(data=True), key=lambda e: (G.nodes[e[1]]["layer"], e[0])):
        print(f"  {u:>22} -> {v:<22} {d['similarity']:.3f}  ({d['kind']})")
    labelled = [n for n in G if G.nodes[n].get("label")]
    for n in sorted(labelled, key=lambda n: (G.nodes[n]["layer"], n)):
        print(f"  {n:>22}: {G.nodes[n].get('explanation') or G.nodes[n]['label']}")
    print("  wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_match(args) -> int:
    from saeflow.flow.pairs import match_pair
    from saeflow.store import write_parquet_atomic

    summary, table = match_pair(args.a, args.b, method=args.method, k=args.k,
                                model=optional_model(args.model), precision=args.precision)
    if args.out:
        write_parquet_atomic(table, Path(args.out))
        summary["out"] = args.out
    if args.json:
        print_json(summary)
        return 0
    print(f"{summary['a_slot']} ({summary['n_a']} features) -> {summary['b_slot']} "
          f"({summary['n_b']} features), method {summary['method']}")
    print(f"  top-1 similarity: mean {summary['mean_top1']:.3f}, median {summary['median_top1']:.3f}")
    print(f"  above chance (null q{summary['null_quantile']} = {summary['null_threshold']:.3f}): "
          f"{100 * summary['share_above_null']:.1f}%;  >= 0.5: {100 * summary['share_above_0.5']:.1f}%;"
          f"  mutual top-1: {100 * summary['share_mutual_top1']:.1f}%")
    if args.out:
        print(f"  wrote {args.out}")
    return 0


def _flow_options(fl) -> None:
    from saeflow.features.liveness import firing_pass
    from saeflow.flow.compute import run_flow
    from saeflow.flow.config import FlowConfig

    fl.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    add_selectors(fl, variant_seed=True)
    fl.add_argument("--out", required=True, help="RUN directory")
    fl.add_argument("--model", default=None,
                    help="needed when attention SAEs sit at attn_z or on raw module outputs; "
                         "also runs the firing pass that finds dead latents")
    fl.add_argument("--layers", type=parse_layers_arg, default=None, help="all, 0-5, or 1,3,7")
    g = fl.add_argument_group("matching")
    add_config_options(g, FlowConfig, skip=("seed",),
                       flags={"memory_budget_mb": ["--memory-mb", "--memory-budget-mb"]})
    g = fl.add_argument_group("classes")
    for kind in ("res", "mlp", "attn"):
        g.add_argument(f"--high-{kind}", type=float, default=None,
                       help=f"class threshold for s_{kind}, all layers (default: from the null)")
    g.add_argument("--thresholds", default=None,
                   help='JSON file: {"res": 0.4, "layers": {"12": {"mlp": 0.2}}}')
    add_signature_options(g, run_flow, {"t_res": "chain threshold for persistence"})
    add_scale(fl, only=["workers", "ray_address", "retries"])
    fl.add_argument("--no-plots", action="store_true")
    g = fl.add_argument_group("dead latents")
    g.add_argument("--keep-dead", action="store_true",
                   help="keep latents that never (or rarely) fire in the lists and class shares")
    add_signature_options(g, firing_pass, {
        "tokens": "tokens of the firing pass that finds dead latents (with --model and no "
                  "index in RUN)"}, flags={"tokens": ["--firing-tokens"]},
        reads={"tokens": TOKENS})
    fl.add_argument("--force", action="store_true", help="replace the flow of another pack in RUN")
    add_json(fl)
    fl.set_defaults(func=cmd_flow)


def _trace_options(tc) -> None:
    tc.add_argument("run", help="RUN directory written by `saeflow flow`")
    tc.add_argument("feature", help="LAYER/POSITION/INDEX")
    add_config_options(tc, TraceConfig)
    tc.add_argument("--pack", default=None, help="check that RUN was computed from this pack")
    tc.add_argument("--out", default=None, help="default: RUN/traces/FEATURE")
    tc.add_argument("--picture", default="svg,png", help="svg, png, both, or '' for none")
    add_json(tc, "print the node-link JSON")
    tc.set_defaults(func=cmd_trace)


def _match_options(mt) -> None:
    from saeflow.flow.config import FlowConfig

    mt.add_argument("a", help="SAE folder, or PACK@LAYER/POSITION")
    mt.add_argument("b", help="SAE folder, or PACK@LAYER/POSITION")
    add_config_options(mt, FlowConfig, only=["method", "k", "precision"])
    mt.add_argument("--model", default=None, help="needed for attn_z SAEs")
    mt.add_argument("--out", default=None, help="write the matches as parquet")
    add_json(mt)
    mt.set_defaults(func=cmd_match)


def register(sub) -> None:
    command(sub, "flow", "data-free feature flow of a pack: predecessors, classes, plots",
            _flow_options)
    command(sub, "trace", "the flow graph of one feature, e.g. 12/resid_post/4230",
            _trace_options)
    command(sub, "match", "match the features of any two SAEs", _match_options)
