"""`saeflow ...`: a thin command line over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- info ---------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from saeflow.lm.model import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    a = model.anatomy()
    a["load_seconds"] = round(model.load_seconds, 2)
    if args.json:
        _print_json(a)
        return 0
    print(f"model       {a['model']}  ({a['source']})")
    print(f"family      {a['family']}  [{a['hf_class']}, model_type {a['model_type']}]")
    print(f"layers      {a['n_layers']}    d_model {a['d_model']}    vocab {a['vocab_size']}    "
          f"heads {a['n_heads']} x {a['d_head']}")
    print(f"dtype       {a['dtype']} on {a['device']}    loaded in {a['load_seconds']:.1f}s")
    print("hook points (HF module.site  |  TransformerLens name  |  width)")
    for layer in a["layers"]:
        print(f"  layer {layer['layer']}")
        for pos, hp in layer["hook_points"].items():
            print(f"    {pos:<11} {hp['hf_name']:<52} {hp['tl_name'] or '-':<28} {hp['width']}")
    return 0


# --- pack ---------------------------------------------------------------------------------
def _open_pack(args, model=None, strict: bool = True):
    from saeflow.saes.recipes import EMBEDDED_NAMES, open_pack

    if args.path in EMBEDDED_NAMES:
        return open_pack(args.path, model=model)
    family = getattr(args, "family", None) or (model.arch.family if model is not None else None)
    return open_pack(args.path, model=model, position=getattr(args, "position", None),
                     width=getattr(args, "width", None), l0=getattr(args, "l0", None),
                     family=family, seed=getattr(args, "variant_seed", None),
                     best=getattr(args, "best", False), strict=strict)


def cmd_train(args) -> int:
    from saeflow.lm.corpora import parse_tokens
    from saeflow.lm.hookpoints import parse_layers
    from saeflow.lm.model import load_model
    from saeflow.saes.train import TrainConfig, train_family

    model = load_model(args.model, device=args.device)
    cfg = TrainConfig(positions=[p.strip() for p in args.positions.split(",") if p.strip()],
                      layers=parse_layers(args.layers, model.n_layers), width=args.width, k=args.k,
                      architecture=args.architecture, tokens=parse_tokens(args.tokens),
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, ctx_len=args.ctx_len,
                      corpus=args.corpus, chunk_tokens=args.chunk_tokens,
                      model_dtype=args.model_dtype, encoder_dtype=args.encoder_dtype,
                      checkpoint_every_s=args.checkpoint_every)
    res = train_family(model, cfg, args.out, overwrite=args.overwrite)
    print(f"wrote {len(res.pack)} SAEs to {res.pack.root} ({res.tokens} tokens, "
          f"{res.wall_seconds / 60:.1f} min)")
    return 0


def cmd_pack_eval(args) -> int:
    from saeflow.lm.corpora import parse_tokens
    from saeflow.saes.evaluate import evaluate_pack, format_table

    model, pack = _model_and_pack(args, "pack eval")
    res = evaluate_pack(pack, model, tokens=parse_tokens(args.tokens),
                        ce_tokens=parse_tokens(args.ce_tokens), corpus=args.corpus)
    if args.json:
        _print_json(res)
    else:
        print(format_table(res))
    return 0


def cmd_pack_inspect(args) -> int:
    model = None
    if args.model:
        from saeflow.lm.model import load_model

        model = load_model(args.model, device="cpu")
    pack = _open_pack(args, model=model, strict=False)  # list what `load` would refuse too
    n_layers = args.n_layers
    if model is not None:
        n_layers = model.n_layers
        pack.check_model(model)
    d = pack.describe(n_layers)
    if args.verify:
        d["verify_problems"] = pack.verify()
    if args.json:
        _print_json(d)
        return 0
    print(f"pack        {d['root']}")
    print(f"format      {d['source_format']}    model {d['model'] or '?'}    "
          f"d_model {d['d_model'] or '?'}    layers {d['n_layers'] or '?'}")
    print(f"SAEs        {d['n_saes']} at positions {', '.join(d['positions'])}")
    print(f"  {'position':<11}{'layer':>5}  {'d_in':>6}  {'d_sae':>7}  {'arch':<9} {'dtype':<9} "
          f"{'format':<12} path")
    for r in d["saes"]:
        print(f"  {r['position']:<11}{r['layer']:>5}  {r['d_in']:>6}  {r['d_sae']:>7}  "
              f"{r['architecture']:<9} {r['dtype']:<9} {r['format']:<12} {r['path']}")
        for o in r.get("options") or []:
            print(f"      option: {o}")
    for c in d["choices"]:
        print(f"  note: {c}")
    for r in d["refused"]:
        print(f"  REFUSED: {r['path']}: {r['why']}")
    if d["missing"]:
        by_pos: dict[str, list[int]] = {}
        for m in d["missing"]:
            by_pos.setdefault(m["position"], []).append(m["layer"])
        print(f"incomplete: {len(d['missing'])} slot(s) missing")
        for p, ls in by_pos.items():
            print(f"  {p}: layers {_ranges(ls)}")
    else:
        print("complete: every layer has an SAE at every position present")
    if d["refused"]:
        print(f"{len(d['refused'])} SAE(s) above cannot be loaded exactly; other commands refuse "
              f"this family until they are removed")
    if args.verify:
        probs = d["verify_problems"]
        print("verify: OK" if not probs else "verify: FAILED\n  " + "\n  ".join(probs))
        return 1 if probs else 0
    return 1 if d["refused"] else 0


def _ranges(xs: list[int]) -> str:
    xs, out, i = sorted(xs), [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def cmd_pack_convert(args) -> int:
    from saeflow.saes.packs import convert_pack

    pack = _open_pack(args)
    out = convert_pack(pack, args.out, model_name=args.model_name, n_layers=args.n_layers,
                       overwrite=args.force, progress=True)
    print(f"wrote saeflow pack with {len(out)} SAEs to {out.root}")
    return 0


def cmd_pack_fetch(args) -> int:
    from saeflow.saes.hub import fetch

    pack = fetch(args.release, out=args.out, layers=args.layers, width=args.width, l0=args.l0,
                 positions=args.positions, mirror=args.mirror, overwrite=args.force,
                 ids=args.ids.split(",") if args.ids else None)
    print(f"fetched {len(pack)} SAEs into saeflow pack {pack.root}")
    return 0


# --- flow ---------------------------------------------------------------------------------
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
    from saeflow.flow.predecessors import FlowConfig, run_flow
    from saeflow.lm.hookpoints import parse_layers

    model = None
    if args.model:
        from saeflow.lm.model import load_model

        model = load_model(args.model, device="cpu")
    pack = _open_pack(args, model=model)
    if model is None and "attn_z" in pack.positions:
        raise ValueError("this pack's attention SAEs sit at attn_z (head space); pass --model so "
                         "their directions can be mapped into the residual through W_O")
    if model is None and ({"mlp_raw", "attn_raw"} & set(pack.positions)):
        raise ValueError("this pack has SAEs on raw MLP / attention outputs (before any "
                         "post-norm); pass --model so they can be mapped into the residual")
    n_layers = pack.n_layers or (max(pack.layers()) + 1)
    layers = parse_layers(args.layers, n_layers) if args.layers != "all" else None
    cfg = FlowConfig(k=args.k, method=args.method, precision=args.precision, null=args.null,
                     null_samples=args.null_samples, null_quantile=args.null_quantile,
                     memory_budget_mb=args.memory_mb)
    liveness = None
    if not args.keep_dead:
        from saeflow.saes.liveness import firing_pass, liveness_from_index

        liveness = liveness_from_index(args.out, pack)
        if liveness is None and model is not None:
            liveness = firing_pass(pack, model, args.firing_tokens, progress=True)
    run = run_flow(pack, args.out, cfg, layers=layers, thresholds=_thresholds_arg(args),
                   model=model, t_res=args.t_res, force=args.force, liveness=liveness)
    if not args.no_plots:
        from saeflow.flow.plots import write_flow_plots

        write_flow_plots(run, run.root / "plots", t_res=args.t_res)
    counts = run.class_counts()
    if args.json:
        _print_json({"run": str(run.root), "manifest": run.manifest, "class_counts": counts,
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
    from saeflow.flow.predecessors import open_flow
    from saeflow.saes.packs import pack_fingerprint

    run = open_flow(args.run)
    if args.pack:
        from saeflow.saes.recipes import open_pack

        if pack_fingerprint(open_pack(args.pack)) != run.manifest["pack"]["fingerprint"]:
            raise ValueError(f"{args.run} was computed from a different pack than {args.pack} "
                             f"({run.manifest['pack']['root']}); rerun `saeflow flow`")
    G = trace(run, args.feature, t_res=args.t_res, t_mod=args.t_mod, mod_k=args.mod_k,
              direction=args.direction)
    add_labels(G, args.run)  # from RUN's feature index, when it has one
    out = Path(args.out) if args.out else run.root / "traces" / args.feature.replace("/", "_")
    formats = ["json", "graphml", *args.picture.split(",")]
    written = write_graph(G, out, formats=[f for f in formats if f])
    if args.json:
        _print_json(node_link(G))
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
    from saeflow.flow.predecessors import match_pair
    from saeflow.store import write_parquet_atomic

    model = None
    if args.model:
        from saeflow.lm.model import load_model

        model = load_model(args.model, device="cpu")
    summary, table = match_pair(args.a, args.b, method=args.method, k=args.k, model=model,
                                precision=args.precision)
    if args.out:
        write_parquet_atomic(table, Path(args.out))
        summary["out"] = args.out
    if args.json:
        _print_json(summary)
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


# --- index --------------------------------------------------------------------------------
def _model_spec(pack_spec: str, model_spec: str | None, stage: str) -> str:
    """--model, or the embedded model for the embedded packs."""
    model_spec = model_spec or ("embedded" if pack_spec.startswith("embedded") else None)
    if model_spec is None:
        raise ValueError(f"{stage} needs --model (the model the pack was made for)")
    return model_spec


def _model_and_pack(args, stage: str):
    """The model (--model, or the embedded one for the embedded packs) and the pack."""
    from saeflow.lm.model import load_model

    model = load_model(_model_spec(args.path, args.model, stage), device=args.device)
    return model, _open_pack(args, model=model)


def _load_model_and_pack(args, stage: str):
    """The same for commands that name the pack with --pack."""
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import open_pack

    model = load_model(_model_spec(args.pack, args.model, stage), device=args.device)
    return model, open_pack(args.pack, model=model)


def cmd_index(args) -> int:
    from saeflow.features.index import IndexConfig, build_index
    from saeflow.lm.corpora import parse_tokens

    model, pack = _model_and_pack(args, "index")
    cfg = IndexConfig(tokens=parse_tokens(args.tokens), corpus=args.corpus, seed=args.seed,
                      batch_size=args.batch_size, ctx_len=args.ctx_len, n_top=args.n_top,
                      n_samples=args.n_samples, encoder_dtype=args.encoder_dtype)
    idx = build_index(pack, model, args.out, cfg, force=args.force)
    m = idx.manifest
    print(f"indexed {sum(m['slots'].values())} features of {len(m['slots'])} SAEs over "
          f"{m['tokens']} tokens ({m['seconds'] / 60:.1f} min) -> {idx.root}")
    return 0


def cmd_search(args) -> int:
    from saeflow.features.tables import open_index

    hits = open_index(args.run).search(args.query, limit=args.limit)
    if args.json:
        _print_json(hits)
        return 0
    if not hits:
        print(f"no feature mentions {args.query!r}")
    for h in hits:
        print(f"  {h['id']:<22} score {h['score']:.2f}  density {h['density']:.2e}  {h['label']}"
              + (f"  | {h['explanation']}" if h.get("explanation") else ""))
    return 0


def cmd_dashboards(args) -> int:
    from saeflow.features.dashboards import export_dashboards

    slots = [s.strip() for s in args.slots.split(",") if s.strip()] if args.slots else None
    paths = export_dashboards(args.run, out=args.out, slots=slots)
    print(f"wrote {len(paths)} dashboard file(s) (Neuronpedia feature JSON) to "
          f"{paths[0].parent if paths else args.out}")
    return 0


def cmd_explain(args) -> int:
    from saeflow.features.explain import ExplainerConfig, explain_features
    from saeflow.lm.hookpoints import parse_layers

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    cfg = ExplainerConfig(url=args.llm_url, model=args.llm, api_key=key,
                          n_examples=args.n_examples)
    feats = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    layers = parse_layers(args.layers, None)
    positions = [p.strip() for p in args.positions.split(",")] if args.positions else None
    out = explain_features(args.run, cfg, feats, layers=layers, positions=positions,
                           limit=args.limit, force=args.force, progress=not args.json)
    if args.json:
        _print_json(out)
        return 0
    for fid, text in out.items():
        print(f"  {fid:<22} {text}")
    return 0


def cmd_feature(args) -> int:
    from saeflow.features.tables import open_index
    from saeflow.ids import parse_feature

    L, pos, f = parse_feature(args.feature)
    row = open_index(args.run).feature(L, pos, f)
    if args.json:
        _print_json(row)
        return 0
    print(f"{args.feature}: {row['label']}")
    if row.get("explanation"):
        print(f"  explained: {row['explanation']}")
    print(f"  density {row['density']:.2e}  mean {row['mean_act']:.3g}  max {row['max_act']:.3g}"
          + (f"  {row['neuronpedia']}" if row['neuronpedia'] else ""))
    print("  logit lens +: " + ", ".join(repr(t["token"]) for t in row["logit_top"]))
    print("  logit lens -: " + ", ".join(repr(t["token"]) for t in row["logit_bottom"]))
    for e in row["examples"][:args.n]:
        toks = "".join(f"[{t}]" if i == e["center"] else (t or "")
                       for i, t in enumerate(e["tokens"]))
        print(f"  {e['activation']:7.3f}  {toks!r}")
    return 0


# --- stats --------------------------------------------------------------------------------
def cmd_stats(args) -> int:
    from saeflow.evolution.analyses import write_evolution_outputs
    from saeflow.evolution.stats import StatsConfig, run_stats
    from saeflow.lm.corpora import parse_tokens

    model, pack = _model_and_pack(args, "stats")
    cfg = StatsConfig(tokens=parse_tokens(args.tokens), corpus=args.corpus, seed=args.seed,
                      batch_size=args.batch_size, ctx_len=args.ctx_len, pairs=args.pairs,
                      positions=args.positions,
                      active=args.active, top_k=args.top_k, floor=args.floor,
                      encoder_dtype=args.encoder_dtype)
    st = run_stats(pack, model, args.out, cfg, force=args.force)
    summary = write_evolution_outputs(args.out, st, pack, pass_threshold=args.pass_threshold,
                                      gate_threshold=args.gate_threshold,
                                      gate_min_count=args.gate_min_count,
                                      gate_max_up_density=args.gate_max_up_density,
                                      gate_min_up_count=args.gate_min_up_count,
                                      community_floor=args.community_floor,
                                      resolution=args.resolution, method=args.community_method)
    if args.json:
        _print_json(summary)
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


# --- steer --------------------------------------------------------------------------------
def _int_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def cmd_steer(args) -> int:
    from saeflow.steering.generate import SamplingConfig, steer
    from saeflow.steering.plans import SteeringPlan, build_plan

    if bool(args.plan) == bool(args.feature):
        raise ValueError("give either --plan PLAN.json or --feature LAYER/POSITION/INDEX")
    _model_spec(args.pack, args.model, "steer")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, n=args.n,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    cfg.check(args.force)  # before loading anything
    model, pack = _load_model_and_pack(args, "steer")
    if args.plan:
        plan = SteeringPlan.load(args.plan)
    else:
        plan = build_plan(pack, feature=args.feature, strength=args.strength,
                          graph_mode=args.mode, kind=args.kind, layer=args.layer,
                          schedule=args.schedule, alpha=args.alpha,
                          tokens=_int_list(args.at_tokens), run=args.run, model=model,
                          t_res=args.t_res, t_mod=args.t_mod,
                          positions=tuple(args.graph_positions.split(",")))
    if args.save_plan:
        plan.check(pack, force=args.force)
        plan.save(args.save_plan)
    res = steer(model, pack, plan, args.prompt, cfg, run=args.run, force=args.force)
    if args.json:
        from saeflow.store import write_json_atomic

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


# --- run ----------------------------------------------------------------------------------
def cmd_run(args) -> int:
    import dataclasses
    import shlex

    from saeflow.lm.corpora import parse_tokens
    from saeflow.pipeline.stages import PROFILES, run_pipeline

    cfg = dataclasses.replace(PROFILES[args.profile], model=args.model, device=args.device)
    if args.pack:
        cfg.pack = args.pack
    elif args.model not in ("embedded", "gemma-3-270m"):
        raise ValueError(f"give --pack for {args.model}: the embedded pack belongs to the "
                         f"embedded model")
    if args.corpus:
        cfg.corpus = args.corpus
    if args.index_tokens:
        cfg.index_tokens = parse_tokens(args.index_tokens)
    if args.stats_tokens:
        cfg.stats_tokens = parse_tokens(args.stats_tokens)
    split = (lambda t: [x.strip() for x in t.split(",") if x.strip()] if t else None)
    run_pipeline(args.out, cfg, only=split(args.only), skip=split(args.skip), force=args.force,
                 command="saeflow " + " ".join(shlex.quote(a) for a in args.argv))
    if args.serve:
        from saeflow.app.server import serve

        serve(args.out, port=args.port, model=args.model)
    return 0


# --- serve --------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from saeflow.app.server import serve

    serve(args.run, host=args.host, port=args.port, pack=args.pack, model=args.model,
          open_browser=args.open)
    return 0


# --- validate -----------------------------------------------------------------------------
def _float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_validate(args) -> int:
    from saeflow.steering.validate import (
        VALIDATE_DIR,
        ValidateConfig,
        breakdown_markdown,
        run_validation,
        table_markdown,
        write_r_sweep,
    )

    cfg = ValidateConfig(layers=_int_list(args.layers), texts=args.texts,
                         tokens_per_text=args.tokens_per_text,
                         max_features=None if args.targets == "all" else args.max_features,
                         target_choice=args.targets, ctx_len=args.ctx_len, corpus=args.corpus,
                         seed=args.seed, ci_halfwidth=args.ci, max_texts=args.max_texts,
                         keep_dead=args.keep_dead, r_values=_float_list(args.r_values),
                         r_graphs=args.r_graphs, r_texts=args.r_texts)
    cfg.check()  # bad settings fail before the model loads
    model, pack = _load_model_and_pack(args, "validate")
    for L in _int_list(args.layers) or []:
        model.check_layer(L)
    summary = run_validation(pack, model, args.run, cfg)
    print(f"deactivation on {summary['texts']} texts, layers {summary['layers']}, "
          f"{summary['targets']} targets chosen {cfg.target_choice}ly "
          f"({summary['seconds']:.0f} s); 95% CIs clustered by text:")
    print(table_markdown(summary))
    ci = summary["ci_target"]
    if ci["halfwidth_asked"] is not None:
        print(f"CI half-width asked {100 * ci['halfwidth_asked']:.0f} points: "
              f"{'met' if ci['met'] else 'NOT met (raise --max-texts)'} "
              f"({', '.join(f'{m} {100 * v:.1f}' for m, v in ci['halfwidths'].items())})")
    pt = summary.get("paired_top1", {}).get("minus_control")
    if pt and pt["cases"]:
        print(f"top-1 cosine minus the matched control on the same {pt['cases']} targets: "
              f"{100 * pt['difference']:+.1f} points [{100 * pt['ci95'][0]:+.1f}, "
              f"{100 * pt['ci95'][1]:+.1f}]")
    print("success by the target's activation rank (0 = most active at the token):")
    print(breakdown_markdown(summary, "by_target_rank", title="rank"))
    print("success by the cosine of the removed predecessor to the target:")
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


# --- steer-sweep --------------------------------------------------------------------------
def cmd_steer_sweep(args) -> int:
    from saeflow.steering.sweep import run_sweep, sweep_profile

    _model_spec(args.pack, args.model, "steer-sweep")
    seeds = {}
    for item in (args.seed_features or "").split(","):
        if item.strip():
            th, _, fids = item.partition("=")
            ids = [f.strip() for f in fids.split("+") if f.strip()]
            seeds[th.strip()] = ids[0] if len(ids) == 1 else ids
    profile = "paper" if args.paper else args.profile
    split = lambda v: None if v is None else v.split(",")  # noqa: E731
    cfg = sweep_profile(
        profile, themes=split(args.themes), modes=split(args.modes),
        strengths=None if args.strengths is None else _float_list(args.strengths),
        max_layers=args.max_layers, prompt=args.prompt, n=args.n,
        max_new_tokens=args.max_new_tokens,
        seeds=None if args.seeds is None else _int_list(args.seeds), kind=args.kind,
        seeds_per_theme=args.seeds_per_theme, seed_features=seeds or None,
        classifier_docs=args.classifier_docs, temperature=args.temperature, top_p=args.top_p)
    if args.classifier_docs == 0:
        cfg.classifier_docs = None  # every summary
    cfg.check()
    judge_cfg = None
    if args.llm_url:
        from saeflow.features.explain import ExplainerConfig

        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        judge_cfg = ExplainerConfig(url=args.llm_url, model=args.llm or "", api_key=key)
    model, pack = _load_model_and_pack(args, "steer-sweep")
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


# --- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from saeflow._version import __version__

    p = argparse.ArgumentParser(prog="saeflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"saeflow {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    info = sub.add_parser("info", help="load a model and print its anatomy and hook points")
    info.add_argument("--model", default="embedded",
                      help="'embedded', an HF folder, a hub id, or a .gguf file")
    info.add_argument("--device", default=None, help="cuda, mps or cpu (default: automatic)")
    info.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="train an SAE family from one pass over a corpus")
    tr.add_argument("--model", default="embedded")
    tr.add_argument("--positions", default="resid_post,mlp_out,attn_out")
    tr.add_argument("--layers", default="all", help="all, 0-5, or 1,3,7")
    tr.add_argument("--width", type=int, default=4096)
    tr.add_argument("--k", type=int, default=32)
    tr.add_argument("--architecture", default="topk", choices=["topk", "batchtopk"])
    tr.add_argument("--tokens", default="300k")
    tr.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--ctx-len", type=int, default=128)
    tr.add_argument("--corpus", default="wiki=0.8,python=0.2",
                    help="sources with text shares: wiki, python, PATH, hf:NAME")
    tr.add_argument("--chunk-tokens", type=int, default=8192,
                    help="tokens shuffled together; checkpoints fall between chunks")
    tr.add_argument("--model-dtype", default="auto", help="capture dtype: auto, float32, bfloat16")
    tr.add_argument("--encoder-dtype", default="auto", help="encoder matmul: auto, float32, bfloat16")
    tr.add_argument("--checkpoint-every", type=float, default=180.0, help="seconds")
    tr.add_argument("--device", default=None)
    tr.add_argument("--out", required=True)
    tr.add_argument("--overwrite", action="store_true", help="replace a different pack at --out")
    tr.set_defaults(func=cmd_train)

    pack = sub.add_parser("pack", help="inspect, convert, evaluate and fetch SAE families")
    psub = pack.add_subparsers(dest="pack_cmd", required=True)

    def selectors(sp, variant_seed=False):
        sp.add_argument("--position", default=None,
                        help="position for SAEs whose files do not say it (Gemma Scope npz)")
        sp.add_argument("--width", default=None, help="variant to take, e.g. 16k")
        sp.add_argument("--l0", default=None, help="variant to take, e.g. 82 or medium")
        if variant_seed:  # commands with a sampling --seed do not get this one
            sp.add_argument("--seed", type=int, default=None, dest="variant_seed",
                            help="sparsify multi-seed run: the seed to take (default: the lowest)")
        sp.add_argument("--best", action="store_true",
                        help="sparsify save_best run: take best/ (default: the final checkpoint)")
        sp.add_argument("--family", default=None,
                        help="model family for HF hook names (gemma3, llama, ...); --model sets it")

    ins = psub.add_parser("inspect", help="list the SAEs of a family and the missing slots")
    ins.add_argument("path")
    selectors(ins, variant_seed=True)
    ins.add_argument("--model", default=None, help="check against this model (d_in, layers)")
    ins.add_argument("--n-layers", type=int, default=None, help="layers the family should cover")
    ins.add_argument("--verify", action="store_true",
                     help="check each cfg against its tensor headers and hashes in pack.json")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_pack_inspect)

    conv = psub.add_parser("convert", help="write any supported family as a saeflow pack")
    conv.add_argument("path")
    conv.add_argument("out")
    selectors(conv, variant_seed=True)
    conv.add_argument("--model-name", default=None)
    conv.add_argument("--n-layers", type=int, default=None)
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(func=cmd_pack_convert)

    ev = psub.add_parser("eval", help="FVU, L0, dead/dense fractions, ΔCE and KL per SAE")
    ev.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    selectors(ev)
    ev.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    ev.add_argument("--tokens", default="8k", help="held-out tokens for FVU/L0/dead/dense")
    ev.add_argument("--ce-tokens", default="1k", help="held-out tokens for ΔCE/KL (costly)")
    ev.add_argument("--corpus", default="wiki=0.8,python=0.2")
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_pack_eval)

    fet = psub.add_parser("fetch", help="download a published family (needs the hub)")
    fet.add_argument("release", help="e.g. gemma-scope-2b-pt-res-canonical, "
                     "gemma-scope-2-270m-pt-res, a SAELens release, or a hub repo owner/name")
    fet.add_argument("--layers", default="all", help="e.g. 0-25 or 3,6,9")
    fet.add_argument("--width", default=None, help="e.g. 16k")
    fet.add_argument("--l0", default=None, help="e.g. 82, medium; default: canonical choice")
    fet.add_argument("--positions", default=None,
                     help="Gemma Scope 2: comma list of resid_post,mlp_out,attn_z")
    fet.add_argument("--ids", default=None,
                     help="SAELens release: comma list of SAE ids, e.g. blocks.8.hook_resid_pre")
    fet.add_argument("--out", default=None, help="pack dir (default: cache/packs/RELEASE)")
    fet.add_argument("--mirror", default=None,
                     help="read from a local directory laid out like the hub (also "
                          "$SAEFLOW_HUB_MIRROR)")
    fet.add_argument("--force", action="store_true")
    fet.set_defaults(func=cmd_pack_fetch)

    fl = sub.add_parser("flow", help="data-free feature flow of a pack: predecessors, classes, plots")
    fl.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    selectors(fl, variant_seed=True)
    fl.add_argument("--out", required=True, help="RUN directory")
    fl.add_argument("--model", default=None, help="needed when attention SAEs sit at attn_z")
    fl.add_argument("--layers", default="all", help="all, 0-5, or 1,3,7")
    fl.add_argument("--k", type=int, default=5, help="matches kept per feature and predecessor")
    fl.add_argument("--method", default="decoder",
                    choices=["decoder", "encoder", "folded", "permutation"])
    fl.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16 ranks in bf16 and re-scores the candidates exactly in fp32")
    fl.add_argument("--null", default="shuffle", choices=["shuffle", "gaussian"],
                    help="null model for the default class thresholds")
    fl.add_argument("--null-samples", type=int, default=2048)
    fl.add_argument("--null-quantile", type=float, default=0.99)
    for kind in ("res", "mlp", "attn"):
        fl.add_argument(f"--high-{kind}", type=float, default=None,
                        help=f"class threshold for s_{kind}, all layers (default: from the null)")
    fl.add_argument("--thresholds", default=None,
                    help='JSON file: {"res": 0.4, "layers": {"12": {"mlp": 0.2}}}')
    fl.add_argument("--t-res", type=float, default=0.5, help="chain threshold for persistence")
    fl.add_argument("--memory-mb", type=int, default=512,
                    help="dictionaries larger than this are streamed from disk in blocks")
    fl.add_argument("--no-plots", action="store_true")
    fl.add_argument("--keep-dead", action="store_true",
                    help="keep latents that never (or rarely) fire in the lists and class shares")
    fl.add_argument("--firing-tokens", type=int, default=16_384,
                    help="tokens of the firing pass that finds dead latents (with --model and "
                         "no index in RUN)")
    fl.add_argument("--force", action="store_true", help="replace the flow of another pack in RUN")
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=cmd_flow)

    tc = sub.add_parser("trace", help="the flow graph of one feature, e.g. 12/resid_post/4230")
    tc.add_argument("run", help="RUN directory written by `saeflow flow`")
    tc.add_argument("feature", help="LAYER/POSITION/INDEX")
    tc.add_argument("--t-res", type=float, default=0.5)
    tc.add_argument("--t-mod", type=float, default=0.15)
    tc.add_argument("--mod-k", type=int, default=1, help="MLP/attention predecessors per node")
    tc.add_argument("--direction", default="both", choices=["both", "backward", "forward"])
    tc.add_argument("--pack", default=None, help="check that RUN was computed from this pack")
    tc.add_argument("--out", default=None, help="default: RUN/traces/FEATURE")
    tc.add_argument("--picture", default="svg,png", help="svg, png, both, or '' for none")
    tc.add_argument("--json", action="store_true", help="print the node-link JSON")
    tc.set_defaults(func=cmd_trace)

    mt = sub.add_parser("match", help="match the features of any two SAEs")
    mt.add_argument("a", help="SAE folder, or PACK@LAYER/POSITION")
    mt.add_argument("b", help="SAE folder, or PACK@LAYER/POSITION")
    mt.add_argument("--method", default="decoder",
                    choices=["decoder", "encoder", "folded", "permutation"])
    mt.add_argument("--k", type=int, default=5)
    mt.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    mt.add_argument("--model", default=None, help="needed for attn_z SAEs")
    mt.add_argument("--out", default=None, help="write the matches as parquet")
    mt.add_argument("--json", action="store_true")
    mt.set_defaults(func=cmd_match)

    ix = sub.add_parser("index", help="feature index: top contexts, densities, logit lens, labels")
    ix.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    selectors(ix)
    ix.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    ix.add_argument("--out", required=True, help="RUN directory (writes RUN/index/)")
    ix.add_argument("--tokens", default="200k")
    ix.add_argument("--corpus", default="wiki=0.8,python=0.2")
    ix.add_argument("--seed", type=int, default=0)
    ix.add_argument("--batch-size", type=int, default=32, help="contexts per forward")
    ix.add_argument("--ctx-len", type=int, default=128)
    ix.add_argument("--n-top", type=int, default=16, help="top contexts kept per feature")
    ix.add_argument("--n-samples", type=int, default=8, help="random contexts per feature")
    ix.add_argument("--encoder-dtype", default="auto", help="auto, float32, bfloat16")
    ix.add_argument("--device", default=None)
    ix.add_argument("--force", action="store_true",
                    help="start over when RUN holds an index or partial state of another pack")
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser("search", help="find features by label or token, best first")
    se.add_argument("run")
    se.add_argument("query")
    se.add_argument("--limit", type=int, default=20)
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_search)

    ex = sub.add_parser("explain", help="explain features with an LLM (any OpenAI-compatible API)")
    ex.add_argument("run", help="RUN directory with a feature index")
    ex.add_argument("--llm-url", required=True,
                    help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    ex.add_argument("--llm", required=True, help="the endpoint's model name")
    ex.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the API key (unset: no key is sent)")
    ex.add_argument("--features", default=None, help="comma list, e.g. 8/resid_post/12,9/mlp_out/3")
    ex.add_argument("--layers", default="all")
    ex.add_argument("--positions", default=None, help="comma list (default: all)")
    ex.add_argument("--limit", type=int, default=100, help="densest active features first")
    ex.add_argument("--n-examples", type=int, default=8, help="top contexts shown per feature")
    ex.add_argument("--force", action="store_true", help="ask again for features already done")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_explain)

    db = sub.add_parser("dashboards", help="export feature dashboards (Neuronpedia's JSON "
                        "shape) from RUN/index, one file per SAE")
    db.add_argument("run")
    db.add_argument("--out", default=None, help="folder (default: RUN/dashboards)")
    db.add_argument("--slots", default=None, help="comma list, e.g. 6/resid_post,6/mlp_out")
    db.set_defaults(func=cmd_dashboards)

    fe = sub.add_parser("feature", help="one feature's page: label, stats, logit lens, contexts")
    fe.add_argument("run")
    fe.add_argument("feature", help="LAYER/POSITION/INDEX")
    fe.add_argument("--n", type=int, default=8, help="top contexts to print")
    fe.add_argument("--json", action="store_true")
    fe.set_defaults(func=cmd_feature)

    st = sub.add_parser("stats", help="co-activation statistics, pass-through, gates, communities")
    st.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    selectors(st)
    st.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    st.add_argument("--out", required=True, help="RUN directory (writes RUN/stats/)")
    st.add_argument("--tokens", default="200k")
    st.add_argument("--corpus", default="wiki=0.8,python=0.2")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--batch-size", type=int, default=32)
    st.add_argument("--ctx-len", type=int, default=128)
    st.add_argument("--pairs", default="adjacent", choices=["adjacent", "flow", "both"])
    st.add_argument("--positions", default="resid_post",
                    help="adjacent pairs at these positions (comma list, or all); each pair of "
                         "4096-wide SAEs holds 192 MB of sums")
    st.add_argument("--active", default="zero", help="zero (z > 0) or frac:F (z > F * max)")
    st.add_argument("--top-k", type=int, default=10, help="pairs kept per row and column")
    st.add_argument("--floor", type=float, default=0.1, help="and every pair above this")
    st.add_argument("--pass-threshold", type=float, default=0.5)
    st.add_argument("--gate-threshold", type=float, default=0.999)
    st.add_argument("--gate-min-count", type=int, default=5)
    st.add_argument("--gate-max-up-density", type=float, default=0.4,
                    help="ignore upstream features active on more than this share of tokens")
    st.add_argument("--gate-min-up-count", type=int, default=20,
                    help="ignore upstream features active fewer times than this")
    st.add_argument("--community-floor", type=float, default=0.1)
    st.add_argument("--resolution", type=float, default=1.0)
    st.add_argument("--community-method", default="leiden", choices=["leiden", "louvain"])
    st.add_argument("--encoder-dtype", default="auto")
    st.add_argument("--device", default=None)
    st.add_argument("--force", action="store_true")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_stats)
    sr = sub.add_parser("steer", help="default vs steered completions, side by side")
    sr.add_argument("--pack", default="embedded", help="a pack path, or 'embedded'")
    sr.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    sr.add_argument("--plan", default=None, help="a steering plan (JSON)")
    sr.add_argument("--feature", default=None, help="LAYER/POSITION/INDEX to steer")
    sr.add_argument("--mode", default="seed", choices=["seed", "single", "cumulative", "span"],
                    help="the feature alone, or its flow graph at --layer (single), at layers "
                         "<= --layer (cumulative; the whole graph without --layer), or all (span)")
    sr.add_argument("--kind", default="add", choices=["add", "rescale"],
                    help="add: h + s * typical activation * direction; rescale: activation * r")
    sr.add_argument("--strength", type=float, default=4.0, help="s (add) or r (rescale)")
    sr.add_argument("--layer", type=int, default=None)
    sr.add_argument("--schedule", default="constant",
                    choices=["constant", "linear", "exponential"])
    sr.add_argument("--alpha", type=float, default=-0.05, help="exponential schedule rate")
    sr.add_argument("--at-tokens", default=None,
                    help="comma-separated token positions (0 = BOS); default every token")
    sr.add_argument("--graph-positions", default="resid_post",
                    help="which graph nodes to steer, e.g. resid_post,mlp_out,attn_out")
    sr.add_argument("--run", default=None, help="RUN with the flow (and index) of this pack")
    sr.add_argument("--t-res", type=float, default=0.5)
    sr.add_argument("--t-mod", type=float, default=0.15)
    sr.add_argument("--prompt", default="I think")
    sr.add_argument("--n", type=int, default=4)
    sr.add_argument("--max-new-tokens", type=int, default=40)
    sr.add_argument("--temperature", type=float, default=1.0)
    sr.add_argument("--top-p", type=float, default=0.9)
    sr.add_argument("--seed", type=int, default=0)
    sr.add_argument("--force", action="store_true", help="lift the bounds on strength, n, ...")
    sr.add_argument("--save-plan", default=None, help="write the plan used as JSON")
    sr.add_argument("--json", default=None, help="write prompt, plan and completions as JSON")
    sr.add_argument("--device", default=None)
    sr.set_defaults(func=cmd_steer)

    va = sub.add_parser("validate", help="deactivation experiments: do predecessors matter?")
    va.add_argument("run", help="RUN directory (its flow and stats are used; writes RUN/validate)")
    va.add_argument("--pack", default="embedded")
    va.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    va.add_argument("--layers", default=None, help="comma list; default about 1/4, 1/2, 3/4")
    va.add_argument("--texts", type=int, default=12, help="texts (at least, with --ci)")
    va.add_argument("--tokens-per-text", type=int, default=4)
    va.add_argument("--targets", default="random", choices=["random", "all", "most_active"],
                    help="which active features become targets: a uniform sample (default), "
                         "all of them, or the most active (biased towards hard targets)")
    va.add_argument("--max-features", type=int, default=10,
                    help="targets per (text, token, layer)")
    va.add_argument("--ci", type=float, default=None,
                    help="add texts until every headline rate's 95%% CI half-width is at most "
                         "this, e.g. 0.05")
    va.add_argument("--max-texts", type=int, default=200, help="the cap for --ci")
    va.add_argument("--keep-dead", action="store_true",
                    help="keep never-firing latents in the candidate lists")
    va.add_argument("--ctx-len", type=int, default=64)
    va.add_argument("--corpus", default="wiki=0.8,python=0.2")
    va.add_argument("--seed", type=int, default=0)
    va.add_argument("--r-values", default="-2,-1,0,0.5,1,2,3")
    va.add_argument("--r-graphs", type=int, default=4, help="flow graphs in the r sweep (0: none)")
    va.add_argument("--r-texts", type=int, default=8)
    va.add_argument("--device", default=None)
    va.set_defaults(func=cmd_validate)

    sw = sub.add_parser("steer-sweep", help="steering grid: modes x layers x strengths x themes")
    sw.add_argument("run", help="RUN with the flow and feature index of the pack (writes RUN/sweep)")
    sw.add_argument("--pack", default="embedded")
    sw.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    sw.add_argument("--profile", default="ours",
                    choices=["ours", "paper", "paper-activation", "demo", "paper-demo"],
                    help="ours: activation by adding (RUN/sweep); paper: the paper's "
                         "deactivation by rescale (RUN/sweep-paper); the options below "
                         "override a profile's settings")
    sw.add_argument("--paper", action="store_true", help="the same as --profile paper")
    sw.add_argument("--themes", default=None, help="e.g. religion,mathematics,arts,biology")
    sw.add_argument("--modes", default=None, help="seed,single,cumulative,cumulative_norm")
    sw.add_argument("--strengths", default=None,
                    help="typical activations (add), or r (rescale), e.g. 0,-1,-2,-4")
    sw.add_argument("--max-layers", type=int, default=None, help="graph layers tried per theme")
    sw.add_argument("--kind", default=None, choices=["add", "rescale"])
    sw.add_argument("--seeds-per-theme", type=int, default=None,
                    help="seed features per theme, their graphs joined (the paper: 10)")
    sw.add_argument("--prompt", default=None)
    sw.add_argument("--n", type=int, default=None, help="samples per setting and sampling seed")
    sw.add_argument("--max-new-tokens", type=int, default=None)
    sw.add_argument("--temperature", type=float, default=None)
    sw.add_argument("--top-p", type=float, default=None)
    sw.add_argument("--seeds", default=None, help="sampling seeds, e.g. 0,1")
    sw.add_argument("--seed-features", default=None,
                    help="theme=LAYER/POSITION/INDEX[+...],... instead of searching the index")
    sw.add_argument("--classifier-docs", type=int, default=None,
                    help="wiki summaries for the topic classifier (0: all 10,033)")
    sw.add_argument("--llm-url", default=None,
                    help="optional LLM judge: an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    sw.add_argument("--llm", default=None, help="the judge's model name")
    sw.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the judge's API key")
    sw.add_argument("--device", default=None)
    sw.set_defaults(func=cmd_steer_sweep)

    rn = sub.add_parser("run", help="the main job end to end: pack, eval, flow, index, stats, "
                                    "validate, sweep, report (resumable; then --serve)")
    rn.add_argument("--out", required=True, help="the RUN directory")
    rn.add_argument("--model", default="embedded")
    rn.add_argument("--pack", default=None,
                    help="embedded / embedded-quick (trained once into the cache), a pack folder "
                         "(SAELens, Gemma Scope, Gemma Scope 2, sparsify, saeflow) or a hub "
                         "release name (downloaded once); default: the embedded pack")
    rn.add_argument("--profile", default="default", choices=["default", "quick"],
                    help="quick: the small pack and small samples (under 10 min on 2 cores)")
    rn.add_argument("--corpus", default=None, help="e.g. wiki=0.8,python=0.2 or a text file")
    rn.add_argument("--index-tokens", default=None)
    rn.add_argument("--stats-tokens", default=None)
    rn.add_argument("--only", default=None, help="comma-separated stages to run")
    rn.add_argument("--skip", default=None, help="comma-separated stages to leave out")
    rn.add_argument("--force", action="store_true", help="rerun the chosen stages")
    rn.add_argument("--serve", action="store_true", help="start the web app when done")
    rn.add_argument("--port", type=int, default=8765)
    rn.add_argument("--device", default=None)
    rn.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="the web app and JSON API over a RUN (127.0.0.1 by default)")
    sv.add_argument("run", help="RUN from `saeflow flow` / `index` / `stats`")
    sv.add_argument("--port", type=int, default=8765)
    sv.add_argument("--host", default="127.0.0.1",
                    help="bind address; anything but localhost is reachable from other machines")
    sv.add_argument("--pack", default=None, help="default: the pack the run's flow was made from")
    sv.add_argument("--model", default=None,
                    help="the model, for steering and the prompt view (default: embedded for "
                         "runs of the embedded model)")
    sv.add_argument("--open", action="store_true", help="open the browser")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError, ImportError,
            RuntimeError) as e:  # RuntimeError: TrainingError, HubError
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saeflow: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
