"""`saeflow run`: the main job end to end, as resumable stages over one RUN directory.

    pack -> flow -> eval -> index -> stats -> validate -> sweep -> report   (then `serve`)

Eval, the index and the statistics read the same held-out text: `saeflow run` reads it once,
in eval's stage, for all three (the flow comes first because the statistics count co-firing
with the flow's predecessors).

Each stage writes its outputs under RUN and is recorded in RUN/pipeline.json with its settings
and wall time. A second run skips the stages whose settings are unchanged; `only` / `skip`
choose stages and `force` reruns them. The stages themselves resume after a kill (the index and
statistics passes checkpoint; the pack training checkpoints), so Ctrl-C is always safe.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from saeflow.errors import PipelineError
from saeflow.evolution.analyses import write_evolution_outputs
from saeflow.evolution.stats import run_stats, stats_job
from saeflow.features.index import build_index, index_job
from saeflow.features.liveness import firing_pass
from saeflow.flow.compute import run_flow
from saeflow.flow.plots import write_flow_plots
from saeflow.lm.model import MAPPED_POSITIONS, load_model
from saeflow.pipeline.config import PipelineConfig, stage_identity
from saeflow.pipeline.report import write_report
from saeflow.saes.evaluate import check_ce_request, eval_job, with_splice
from saeflow.saes.hub import fetch
from saeflow.saes.packs import load_pack
from saeflow.saes.recipes import EMBEDDED_NAMES, embedded_pack_dir, ensure_embedded_pack
from saeflow.saes.recipes import PROFILES as PACK_PROFILES
from saeflow.scale import ScaleConfig
from saeflow.scale.ray_backend import connect
from saeflow.scale.shards import can_share, run_jobs
from saeflow.steering.scores import topic_classifier
from saeflow.steering.sweep import run_sweep
from saeflow.steering.validate import run_validation, write_r_sweep
from saeflow.store import write_json_atomic

STAGES = ("pack", "flow", "eval", "index", "stats", "validate", "sweep", "report")
PIPELINE_FILE = "pipeline.json"


# Seconds per unit on 2 CPU cores at Gemma 3 270M's shapes with the 54-SAE pack, for the
# time-left estimates printed between stages (benchmarks/bench_one_pass.py measures them;
# docs/benchmarks.md). Per token: eval's own pass (capture, 54 encodes, firing counts), what the
# index and the statistics add to a shared pass, each alone; the splice per token and spliced
# SAE; the pack per training token; validate per text of 5 tokens x 3 layers; the sweep per
# generated sample.
RATES = {"pack": 1 / 340, "eval_pass": 3.9e-3, "index_extra": 3.6e-3, "stats_extra": 3.6e-3,
         "index": 4.6e-3, "stats": 5.5e-3, "splice": 4.1e-3, "analyses": 35, "flow": 60,
         "validate": 1.1, "sweep": 1, "report": 12}
# Training tokens per second of the 54-SAE family on a GPU (an H200, stacked engine; measured in
# docs/benchmarks.md): the pack is the one stage with no earlier stage of the run to pace it.
GPU_PACK_TOK_S = 19_458


def pack_advice(cfg: PipelineConfig, cached_pack: bool, gpu: bool) -> str | None:
    """A warning before training a GPU-sized embedded pack without a GPU; None otherwise."""
    if cached_pack or gpu or cfg.pack != "embedded-gpu":
        return None
    tokens = PACK_PROFILES["gpu"].tokens
    return (f"note: --pack embedded-gpu is the gpu profile's pack ({tokens / 1e6:.0f}M training "
            f"tokens), meant for a CUDA GPU (--device cuda): without one it trains for about "
            f"{_fmt(tokens * RATES['pack'])} on 2 cores. For a CPU run use --pack embedded; "
            f"Ctrl-C is safe, the same command resumes.")


def estimate_seconds(cfg: PipelineConfig, stage: str, cached_pack: bool,
                     fused: frozenset[str] | set[str] = frozenset(), gpu: bool = False) -> float:
    """The expected seconds of `stage` on 2 CPU cores (the pack: on a GPU when `gpu`);
    `fused`: the stages eval's pass also feeds."""
    if stage == "pack":
        if cached_pack or cfg.pack not in EMBEDDED_NAMES:
            return 10
        tokens = PACK_PROFILES[EMBEDDED_NAMES[cfg.pack]].tokens
        return tokens / GPU_PACK_TOK_S if gpu else tokens * RATES["pack"]
    if stage == "eval":
        ev = cfg.eval
        n_layers = 18  # the embedded model's; a rough scale for other packs
        spliced = n_layers * (len(ev.ce_positions) if ev.ce_positions else 3)
        extra = (("index" in fused) * cfg.index.tokens * RATES["index_extra"] +
                 ("stats" in fused) * cfg.stats.tokens * RATES["stats_extra"])
        return (30 + max(ev.dead_tokens, ev.tokens) * RATES["eval_pass"] + extra +
                ev.ce_tokens * spliced * RATES["splice"])
    if stage == "index":
        return 5 if "index" in fused else 30 + cfg.index.tokens * RATES["index"]
    if stage == "stats":
        return RATES["analyses"] + (0 if "stats" in fused else cfg.stats.tokens * RATES["stats"])
    if stage == "validate":
        va = cfg.validate
        texts = va.max_texts if va.ci_halfwidth else va.texts
        return 20 + texts * RATES["validate"] * va.tokens_per_text / 5
    if stage == "sweep":
        ours, paper = cfg.sweep.ours, cfg.sweep.paper
        n_gen = len(ours.themes) * len(ours.strengths) * len(ours.seeds) * \
            (1 + 4 * ours.max_layers)
        n_paper = len(paper.strengths) * 2 * paper.max_layers + 1
        return 120 + n_gen * ours.n * 0.75 + n_paper * paper.n * 2.2
    return RATES[stage]


def stage_digest(cfg: PipelineConfig, stage: str) -> str:
    """The digest of a stage's settings that RUN/pipeline.json records (a change reruns it)."""
    ident = stage_identity(cfg, stage)
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("saeflow", "torch", "transformers", "safetensors", "numpy", "duckdb", "plotly",
                "fastapi", "sentence-transformers", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
            f"cpu ({torch.get_num_threads()} threads)"
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out


class Pipeline:
    def __init__(self, out: str | Path, cfg: PipelineConfig, progress: bool = True,
                 scale: ScaleConfig | None = None):
        self.root = Path(out)
        self.cfg = cfg
        self.progress = progress
        self.scale = scale  # flow, index and stats on Ray workers (saeflow.scale)
        self._model = None
        self._pack = None
        self._force = False  # the current stage starts over (changed settings or --force)
        self._fuse: dict[str, str] = {}  # index / stats to feed from eval's pass
        self._fused_done: set[str] = set()  # and those it fed
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / PIPELINE_FILE
        self.state: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {
            "format": "saeflow-pipeline", "stages": {}, "commands": []}

    # --- shared resources --------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:

            self._model = load_model(self.cfg.model, device=self.cfg.device)
        return self._model

    @property
    def pack(self):
        if self._pack is None:
            self._pack = self._open_pack()
        return self._pack

    def _open_pack(self):
        spec = self.cfg.pack
        if spec in EMBEDDED_NAMES:
            if self.cfg.model not in ("embedded", "gemma-3-270m"):
                raise PipelineError(f"the {spec} pack belongs to the embedded model; give "
                                    f"--pack for {self.cfg.model}")
            return ensure_embedded_pack(EMBEDDED_NAMES[spec], model=self.model,
                                        progress=self.progress)
        if Path(spec).exists():

            return load_pack(spec)

        return fetch(spec, out=self.root / "pack")

    # --- bookkeeping -------------------------------------------------------------------
    def _save(self) -> None:
        write_json_atomic(self.root / PIPELINE_FILE, self.state)

    def is_done(self, stage: str) -> bool:
        rec = self.state["stages"].get(stage)
        return bool(rec and rec.get("status") == "done" and
                    rec.get("settings") == stage_digest(self.cfg, stage))

    def plan(self, only=None, skip=None, force: bool = False) -> list[str]:
        for name in list(only or []) + list(skip or []):
            if name not in STAGES:
                raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        todo = [s for s in STAGES if (not only or s in only) and s not in (skip or [])]
        return [s for s in todo if force or not self.is_done(s)]

    def run(self, only=None, skip=None, force: bool = False, command: str | None = None) -> dict:
        todo = self.plan(only, skip, force)
        if command:
            self.state["commands"] = (self.state.get("commands", []) + [command])[-20:]
        self.state["versions"] = versions()
        self.state["config"] = self.cfg.flat()
        self._save()

        cached = (self.cfg.pack not in EMBEDDED_NAMES or
                  (embedded_pack_dir(EMBEDDED_NAMES[self.cfg.pack]) / "pack.json").is_file())
        # index / stats still to run ride on eval's pass ("force": their settings changed)
        self._fuse = {}
        if "eval" in todo:
            for name in ("index", "stats"):
                if name in todo:
                    prev = self.state["stages"].get(name) or {}
                    changed = bool(prev) and prev.get("settings") != stage_digest(
                        self.cfg, name)
                    self._fuse[name] = "force" if (force or changed) else "resume"
        t_all = time.perf_counter()
        gpu = self._on_gpu()
        pace = _Pace(enabled=gpu)  # on a GPU: the CPU rates scaled by the stages done so far
        advice = pack_advice(self.cfg, cached, gpu) if "pack" in todo else None
        if advice:
            self._say(advice)
        for i, stage in enumerate(todo):
            fused = set(self._fuse) if "eval" in todo[i:] else self._fused_done
            est = {s: estimate_seconds(self.cfg, s, cached, fused, gpu) for s in todo[i:]}
            self._say(f"[{i + 1}/{len(todo)}] {stage}: about {_fmt(pace(stage, est[stage]))} "
                      f"(all stages left: about "
                      f"{_fmt(sum(pace(s, e) for s, e in est.items()))})")
            t0 = time.perf_counter()
            digest = stage_digest(self.cfg, stage)
            prev = self.state["stages"].get(stage) or {}
            # changed settings start the stage over; a killed stage with the same ones resumes
            self._force = force or (bool(prev) and prev.get("settings") != digest)
            self.state["stages"][stage] = {"status": "running", "settings": digest,
                                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._save()
            result = getattr(self, f"stage_{stage}")()
            if stage == "eval":
                self._fused_done = set(result.get("fused_with", []))
            dt = time.perf_counter() - t0
            self.state["stages"][stage] = {
                "status": "done", "seconds": round(dt, 1), "settings": digest,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "result": result}
            self._save()
            pace.add(stage, est[stage], dt)
            self._say(f"    {stage} done in {_fmt(dt)}")
        skipped = [s for s in STAGES if s not in todo and self.is_done(s)]
        if skipped:
            self._say(f"reused: {', '.join(skipped)} (unchanged settings; --force reruns)")
        self._say(f"pipeline finished in {_fmt(time.perf_counter() - t_all)}; "
                  f"report: {self.root / 'report.html'}")
        return self.state

    def _on_gpu(self) -> bool:
        """Whether the model runs on a CUDA GPU (the setting, or the automatic choice)."""
        if self._model is not None:
            return self._model.device.type == "cuda"
        import torch

        dev = self.cfg.device
        return torch.device(dev).type == "cuda" if dev else torch.cuda.is_available()

    def _say(self, msg: str) -> None:
        if self.progress:
            print(f"[saeflow run] {msg}", flush=True)

    # --- the stages --------------------------------------------------------------------
    def stage_pack(self) -> dict:
        p = self.pack
        return {"root": str(p.root), "saes": len(p), "positions": p.positions,
                "layers": [min(p.layers()), max(p.layers())]}

    def stage_eval(self) -> dict:
        """Eval's pass over held-out text also feeds the index and the statistics when they
        are still to run with the same corpus settings (one read, one encoding of the codes);
        their stages then find their tables written and finish at once."""
        cfg = self.cfg.eval
        check_ce_request(self.pack, cfg.ce_positions or None, "document")
        job = eval_job(self.pack, self.model, cfg.tokens, cfg.dead_tokens, cfg.corpus,
                       batch=cfg.batch_size, ctx_len=cfg.ctx_len,
                       state_file=self.root / ".pass" / "eval.pt")
        jobs, fused = [job], []
        for name in ("index", "stats"):
            other = self._pass_job(name) if self._fuse.get(name) else None
            if other is not None and can_share([job, other]):
                jobs.append(other)
                fused.append(name)
        if fused:
            self._say(f"    one pass over the corpus for eval, {' and '.join(fused)}")
        t0 = time.perf_counter()
        out = run_jobs(self.model, self.pack, jobs, scale=self.scale, force=self._force,
                       progress=self.progress, state_file=self.root / ".pass" / "state.pt")
        t_pass = time.perf_counter() - t0
        res = with_splice(self.pack, self.model, out["eval"], ce_tokens=cfg.ce_tokens,
                          corpus=cfg.corpus, seed=0, batch=8, ctx_len=cfg.ctx_len,
                          progress=self.progress, ce_positions=cfg.ce_positions or None,
                          ci_by="document", encoder_dtype="auto")
        res["fused_with"] = fused
        res["seconds"] = {"pass": round(t_pass, 1),
                          "splice": round(time.perf_counter() - t0 - t_pass, 1)}
        write_json_atomic(self.root / "eval.json", res)
        return {"saes": len(res["saes"]), "clean_ce": res.get("clean_ce"), "fused_with": fused,
                "seconds": res["seconds"]}

    def _pass_job(self, stage: str):
        """The index's or the statistics' share of a corpus pass (None: already done)."""
        if stage == "index":
            return index_job(self.pack, self.model, self.root, self.cfg.index,
                             force=self._fuse[stage] == "force", progress=self.progress)
        return stats_job(self.pack, self.model, self.root, self.cfg.stats,
                         force=self._fuse[stage] == "force", progress=self.progress)

    def stage_flow(self) -> dict:
        model = self.model if any(p in self.pack.positions for p in MAPPED_POSITIONS) else None
        # Always a firing pass (cached by pack), never the index: the flow must not change
        # when an index appears later in the same RUN.
        liveness = None if self.cfg.flow.keep_dead else firing_pass(
            self.pack, self.model, self.cfg.flow.firing_tokens, self.cfg.corpus,
            progress=self.progress)
        run = run_flow(self.pack, self.root, model=model, progress=self.progress,
                       force=self._force, liveness=liveness, scale=self.scale)
        write_flow_plots(run, run.root / "plots")
        dead = run.manifest.get("dead_latents", {}).get("slots", {})
        return {"layers": len(run.layers), "seconds": run.manifest.get("seconds"),
                "latents_left_out": sum(v["excluded"] for v in dead.values())}

    def stage_index(self) -> dict:
        # written by eval's pass when fused (then this finds them finished)
        force = self._force and "index" not in self._fused_done
        idx = build_index(self.pack, self.model, self.root, self.cfg.index,
                          progress=self.progress, force=force, scale=self.scale)
        return {"tokens": idx.manifest["tokens"], "fused": "index" in self._fused_done}

    def stage_stats(self) -> dict:
        force = self._force and "stats" not in self._fused_done
        st = run_stats(self.pack, self.model, self.root, self.cfg.stats,
                       progress=self.progress, force=force, scale=self.scale)
        s = write_evolution_outputs(self.root, st, self.pack)
        return {"tokens": st.manifest["tokens"], "gates": s["gates"],
                "communities": s["communities"]["n"], "fused": "stats" in self._fused_done}

    def stage_validate(self) -> dict:
        cfg = self.cfg.validate
        summary = run_validation(self.pack, self.model, self.root, cfg)
        if cfg.r_graphs > 0:
            write_r_sweep(self.pack, self.model, self.root, cfg)
        # the rank rule's rates (every method over the same cases)
        return {m: round(r["success_rate"], 4) for m, r in summary["methods"].items()}

    def stage_sweep(self) -> dict:
        sweep = self.cfg.sweep
        clf = topic_classifier(sweep.ours.classifier_docs, progress=self.progress)
        s = run_sweep(self.model, self.pack, self.root, sweep.ours, classifier=clf)
        # The paper's experiment, small: deactivation of "physics" by rescale, 10 seeds.
        p = run_sweep(self.model, self.pack, self.root, sweep.paper, classifier=clf)
        return {"best": len(s["best"]), "minutes": round((s["seconds"] + p["seconds"]) / 60, 1),
                "paper_best": len(p["best"])}

    def stage_report(self) -> dict:
        html, md = write_report(self.root, self.pack)
        return {"html": str(html), "markdown": str(md)}


class _Pace:
    """On a GPU, scales the 2-core CPU estimates by this run's own speed: the ratio of the
    seconds the finished stages took to their estimates (the pack excluded: its GPU rate is its
    own). On a CPU the rates are calibrated already, and one stage's ratio only adds noise."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.estimated = self.took = 0.0

    def add(self, stage: str, estimate: float, seconds: float) -> None:
        if stage != "pack" and estimate >= 5:
            self.estimated += estimate
            self.took += seconds

    def __call__(self, stage: str, estimate: float) -> float:
        if not self.enabled or stage == "pack" or self.estimated < 30:
            return estimate
        return estimate * self.took / self.estimated


def _fmt(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def run_pipeline(out, cfg: PipelineConfig | None = None, *, only=None, skip=None,
                 force: bool = False, progress: bool = True, command: str | None = None,
                 scale: ScaleConfig | None = None) -> dict:
    """Run (or resume) the pipeline into RUN `out`; returns the pipeline state.

    `scale` with workers: the flow, the index and the statistics run on Ray (the same results;
    docs/scale.md). Ray is reached before anything is written."""
    cfg = cfg or PipelineConfig()
    cfg.check()
    if scale is not None and scale.distributed:

        connect(scale)
    return Pipeline(out, cfg, progress, scale).run(only, skip, force, command)
