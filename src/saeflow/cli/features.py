"""`saeflow index|search|explain|dashboards|feature`: features as evidence."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from saeflow.cli.common import (
    add_json,
    add_pass_arguments,
    model_and_pack,
    optional_model,
    print_json,
    scale_from_args,
)
from saeflow.cli.options import (
    add_config_options,
    add_overrides,
    command,
    config_from_args,
    one_line,
    parse_layers_arg,
    parse_str_list,
    signature_default,
)
from saeflow.errors import FeatureIndexError


def cmd_index(args) -> int:
    from saeflow.features.index import IndexConfig, build_index

    scale = scale_from_args(args)
    model, pack = model_and_pack(args, "index")
    idx = build_index(pack, model, args.out, config_from_args(IndexConfig, args), force=args.force,
                      scale=scale)
    m = idx.manifest
    print(f"indexed {sum(m['slots'].values())} features of {len(m['slots'])} SAEs over "
          f"{m['tokens']} tokens ({m['seconds'] / 60:.1f} min) -> {idx.root}")
    return 0


@contextlib.contextmanager
def readable_index(run: str) -> Iterator[None]:
    """A damaged index table (a truncated parquet, say) as one line that says what to do,
    instead of the query engine's traceback."""
    import duckdb
    import pyarrow as pa

    try:
        yield
    except (duckdb.Error, pa.ArrowException) as e:
        raise FeatureIndexError(f"the feature index in {run} cannot be read ({one_line(e)}); "
                                f"rebuild it with `saeflow index PACK --out {run} --force`") \
            from None


def cmd_search(args) -> int:
    from saeflow.features.tables import open_index

    with readable_index(args.run):
        hits = open_index(args.run).search(args.query, limit=args.limit)
    if args.json:
        print_json(hits)
        return 0
    if not hits:
        print(f"no feature mentions {args.query!r}")
    for h in hits:
        print(f"  {h['id']:<22} score {h['score']:.2f}  density {h['density']:.2e}  {h['label']}"
              + (f"  | {h['explanation']}" if h.get("explanation") else ""))
    return 0


def cmd_dashboards(args) -> int:
    from saeflow.features.dashboards import export_dashboards

    paths = export_dashboards(args.run, out=args.out, slots=args.slots, format=args.format,
                              model=optional_model(args.model), model_id=args.model_id,
                              sae_set=args.sae_set)
    what = ("SAEDashboard's Neuronpedia batch JSON" if args.format == "neuronpedia"
            else "saeflow's feature JSON")
    print(f"wrote {len(paths)} dashboard file(s) ({what}) under "
          f"{os.path.commonpath([str(p.parent) for p in paths]) if paths else args.out}")
    return 0


def explainer_from_args(args, **override):
    """The LLM endpoint's config (ExplainerConfig); the key is read from the environment
    variable named."""
    from saeflow.features.explain_config import ExplainerConfig

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    return config_from_args(ExplainerConfig, args, api_key=key, **override)


def add_llm_options(p, judge: bool = False) -> None:
    """The endpoint options; a judge is optional (no --llm-url: no judge)."""
    from saeflow.features.explain_config import ExplainerConfig

    flags = {"url": ["--llm-url"], "model": ["--llm"]}
    if judge:
        g = p.add_argument_group("optional LLM judge (any OpenAI-compatible API)")
        add_overrides(g, ExplainerConfig, ["url", "model"], flags=flags, shown="none")
    else:
        g = p.add_argument_group("LLM endpoint (any OpenAI-compatible API)")
        add_config_options(g, ExplainerConfig, skip=("api_key",), flags=flags)
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (unset: no key is sent)")


def cmd_explain(args) -> int:
    from saeflow.features.explain import explain_features

    out = explain_features(args.run, explainer_from_args(args), args.features,
                           layers=args.layers, positions=args.positions, limit=args.limit,
                           force=args.force, progress=not args.json)
    if args.json:
        print_json(out)
        return 0
    for fid, text in out.items():
        print(f"  {fid:<22} {text}")
    return 0


def cmd_feature(args) -> int:
    from saeflow.features.tables import open_index, open_index_with_lens
    from saeflow.ids import parse_feature

    L, pos, f = parse_feature(args.feature)
    with readable_index(args.run):
        open_index(args.run).feature(L, pos, f)  # unknown ids fail before the model loads
        row = open_index_with_lens(args.run).feature(L, pos, f)
    if args.json:
        print_json(row)
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


def _index_options(ix) -> None:
    from saeflow.features.config import IndexConfig

    add_pass_arguments(ix, IndexConfig, "index")
    g = ix.add_argument_group("what is kept per feature")
    add_config_options(g, IndexConfig, only=["n_top", "n_samples", "window_left", "window_right",
                                             "n_logits", "checkpoint_every_s"])
    ix.add_argument("--force", action="store_true",
                    help="start over when RUN holds an index or partial state of another pack")
    ix.set_defaults(func=cmd_index)


def _search_options(se) -> None:
    from saeflow.features.tables import FeatureIndex

    se.add_argument("run")
    se.add_argument("query")
    se.add_argument("--limit", type=int, default=signature_default(FeatureIndex.search, "limit"),
                    help="hits shown")
    add_json(se)
    se.set_defaults(func=cmd_search)


def _explain_options(ex) -> None:
    from saeflow.features.explain import explain_features

    ex.add_argument("run", help="RUN directory with a feature index")
    add_llm_options(ex)
    ex.add_argument("--features", type=parse_str_list, default=None,
                    help="comma list, e.g. 8/resid_post/12,9/mlp_out/3")
    ex.add_argument("--layers", type=parse_layers_arg, default=None, help="all, 0-5, or 1,3,7")
    ex.add_argument("--positions", type=parse_str_list, default=None,
                    help="comma list (default: all)")
    ex.add_argument("--limit", type=int, default=signature_default(explain_features, "limit"),
                    help="densest active features first")
    ex.add_argument("--force", action="store_true", help="ask again for features already done")
    add_json(ex)
    ex.set_defaults(func=cmd_explain)


def _dashboards_options(db) -> None:
    db.add_argument("run")
    db.add_argument("--out", default=None, help="folder (default: RUN/dashboards)")
    db.add_argument("--slots", type=parse_str_list, default=None,
                    help="comma list, e.g. 6/resid_post,6/mlp_out")
    db.add_argument("--format", choices=["neuronpedia", "saeflow"], default="neuronpedia",
                    help="neuronpedia: LAYER-POSITION/batch-0.json for Neuronpedia's importer "
                         "and SAEDashboard; saeflow: LAYER-POSITION.json, the web app's shape")
    db.add_argument("--model", default=None,
                    help="the model, for the logit histogram (neuronpedia; without it the "
                         "histogram is left empty)")
    db.add_argument("--model-id", default=None,
                    help="Neuronpedia model id (default: the model's name)")
    db.add_argument("--sae-set", default=None,
                    help="Neuronpedia SAE set (default: saeflow-POSITION)")
    db.set_defaults(func=cmd_dashboards)


def _feature_options(fe) -> None:
    fe.add_argument("run")
    fe.add_argument("feature", help="LAYER/POSITION/INDEX")
    fe.add_argument("--n", type=int, default=8, help="top contexts to print")
    add_json(fe)
    fe.set_defaults(func=cmd_feature)


def register(sub) -> None:
    command(sub, "index", "feature index: top contexts, densities, logit lens, labels",
            _index_options)
    command(sub, "search", "find features by label or token, best first", _search_options)
    command(sub, "explain", "explain features with an LLM (any OpenAI-compatible API)",
            _explain_options)
    command(sub, "dashboards", "export feature dashboards from RUN/index, one file per SAE "
            "(SAEDashboard's Neuronpedia batch format by default)", _dashboards_options)
    command(sub, "feature", "one feature's page: label, stats, logit lens, contexts",
            _feature_options)
