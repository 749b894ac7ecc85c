"""Fetch published SAE families by the names users already type, then write a saeflow pack.

    gemma-scope-2b-pt-res-canonical      google/gemma-scope-2b-pt-res, L0 closest to 100 per layer
    gemma-scope-2b-pt-mlp[-canonical]    ... -mlp (mlp_out), -att (attn_z, head space)
    gemma-scope-2-270m-pt-res[-all]      google/gemma-scope-2-270m-pt, resid_post[_all]/ folders
    gemma-scope-2-270m-pt                that repo, several positions (--positions)
    any SAELens release [--ids ...]      resolved through sae_lens's directory (pip install sae-lens)
    owner/name                           a raw hub repo of SAELens-format folders

Downloads go through huggingface_hub (its cache, resume and auth). For tests and air-gapped
machines, a local directory laid out like the hub (ROOT/owner/name/<repo files>) stands in for
it: `--mirror DIR` or $SAEFLOW_HUB_MIRROR. Only the chosen files are downloaded.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from saeflow.errors import HubError
from saeflow.ids import Slot
from saeflow.lm.hookpoints import parse_layers
from saeflow.saes.packs import Pack, convert_pack, load_pack
from saeflow.store import cache_dir

GS_POSITIONS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
GS_LAYERS = {"2b": 26, "9b": 42, "27b": 46}
GS2_FOLDERS = {"resid_post": "resid_post", "mlp_out": "mlp_out", "attn_z": "attn_out"}
GS2_SHORT = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
CANONICAL_L0 = 100.0


# --- downloaders ----------------------------------------------------------------------------
class HubDownloader:
    """The real hub, through huggingface_hub."""

    def list_files(self, repo_id: str) -> list[str]:
        from huggingface_hub import HfApi

        try:
            return list(HfApi().list_repo_files(repo_id))
        except Exception as e:
            raise HubError(f"cannot list hub repo {repo_id!r} ({type(e).__name__}: {e}). Is the "
                           f"hub reachable? Offline, fetch on another machine and pass the "
                           f"folder to `saeflow pack convert`, or use --mirror DIR") from e

    def download(self, repo_id: str, filename: str) -> Path:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception as e:
            raise HubError(f"download of {repo_id}/{filename} failed ({type(e).__name__}: {e})") from e


class MirrorDownloader:
    """A local directory laid out like the hub: ROOT/owner/name/path/in/repo."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"hub mirror directory not found: {self.root}")

    def list_files(self, repo_id: str) -> list[str]:
        base = self.root / repo_id
        if not base.is_dir():
            raise HubError(f"repo {repo_id!r} not found in mirror {self.root}")
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def download(self, repo_id: str, filename: str) -> Path:
        p = self.root / repo_id / filename
        if not p.is_file():
            raise HubError(f"{repo_id}/{filename} not found in mirror {self.root}")
        return p


def get_downloader(mirror: str | None = None):
    mirror = mirror or os.environ.get("SAEFLOW_HUB_MIRROR")
    return MirrorDownloader(mirror) if mirror else HubDownloader()


# --- release plans --------------------------------------------------------------------------
@dataclass
class Plan:
    repo_id: str
    model_name: str
    n_layers: int | None
    files: list[str] = field(default_factory=list)  # repo paths to fetch
    position: str | None = None  # for formats whose files do not say it
    neuronpedia: dict[Slot, str] = field(default_factory=dict)  # Neuronpedia ids


def _gemmascope_plan(m: re.Match, files: list[str], layers, width, l0) -> Plan:
    size, kind, canonical = m.group(1), m.group(2), bool(m.group(3))
    n_layers = GS_LAYERS.get(size)
    plan = Plan(f"google/gemma-scope-{size}-pt-{kind}", f"gemma-2-{size}", n_layers,
                position=GS_POSITIONS[kind])
    pat = re.compile(r"^layer_(\d+)/width_([^/]+)/average_l0_(\d+)/params\.npz$")
    by_layer: dict[int, list[tuple[str, str, str]]] = {}
    for f in files:
        mm = pat.match(f)
        if mm:
            by_layer.setdefault(int(mm.group(1)), []).append((f, mm.group(2), mm.group(3)))
    want_layers = layers if layers is not None else sorted(by_layer)
    width = width or "16k"
    for L in want_layers:
        cands = [c for c in by_layer.get(L, []) if c[1] == width]
        if l0 and not canonical:
            cands = [c for c in cands if c[2] == str(l0)]
        if not cands:
            raise HubError(f"{plan.repo_id} has no layer {L} SAE with width {width}"
                           f"{'' if canonical or not l0 else f' and l0 {l0}'}")
        cands.sort(key=lambda c: abs(float(c[2]) - CANONICAL_L0))
        plan.files.append(cands[0][0])
        plan.neuronpedia[Slot(GS_POSITIONS[kind], L)] = (
            f"gemma-2-{size}/{L}-gemmascope-{kind}-{width}")
    return plan


def _gemmascope2_plan(m: re.Match, files, layers, width, l0, positions) -> Plan:
    size, variant, short, all_ = m.group(1), m.group(2), m.group(3), m.group(4)
    poss = [GS2_SHORT[short]] if short else (positions or ["resid_post", "mlp_out", "attn_z"])
    plan = Plan(f"google/gemma-scope-2-{size}-{variant}", f"gemma-3-{size}", None)
    width, l0 = width or "16k", l0 or "medium"
    pat = re.compile(r"^([a-z_]+?)(_all)?/layer_(\d+)_width_([^_]+)_l0_([^/]+)/params\.safetensors$")
    for pos in poss:
        folder = GS2_FOLDERS[pos]
        # Prefer the all-layers folder when it exists (or when asked for with -all).
        found: dict[int, str] = {}
        for f in files:
            mm = pat.match(f)
            if not mm or mm.group(1) != folder or mm.group(4) != width or mm.group(5) != l0:
                continue
            L = int(mm.group(3))
            if all_ and not mm.group(2):
                continue
            if L not in found or mm.group(2):
                found[L] = f
        want = layers if layers is not None else sorted(found)
        for L in want:
            if L not in found:
                raise HubError(f"{plan.repo_id} has no {folder} SAE for layer {L} at width "
                               f"{width}, l0 {l0}")
            plan.files += [found[L], found[L].replace("params.safetensors", "config.json")]
            plan.neuronpedia[Slot(pos, L)] = f"gemma-3-{size}/{L}-gemmascope-2-{short or pos}-{width}"
    return plan


def saelens_directory() -> dict | None:
    """SAELens's release directory {release: lookup with repo_id, model, saes_map}, if installed."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        return None
    return get_pretrained_saes_directory()


def _saelens_directory_plan(release: str, files_of, layers, ids, directory) -> Plan | None:
    if directory is None or release not in directory:
        return None
    info = directory[release]
    plan = Plan(info.repo_id, info.model, None)
    repo_files = set(files_of(info.repo_id))
    chosen = []
    for sae_id, path in info.saes_map.items():
        if ids is not None and sae_id not in ids:
            continue
        if layers is not None:
            m = re.search(r"(?:blocks|layers?)[._](\d+)", sae_id)
            if m and int(m.group(1)) not in layers:
                continue
        chosen.append(sae_id)
        for name in ("cfg.json", "sae_weights.safetensors", "params.npz", "params.safetensors",
                     "config.json"):
            f = f"{path.strip('/')}/{name}" if path.strip("/") else name
            if f in repo_files:
                plan.files.append(f)
    if ids is not None and len(chosen) != len(ids):
        unknown = sorted(set(ids) - set(chosen))
        raise HubError(f"release {release!r} has no SAE id(s) {unknown}; "
                       f"known: {sorted(info.saes_map)[:10]}...")
    return plan


def _raw_repo_plan(repo_id: str, files: list[str]) -> Plan:
    dirs = {f.rsplit("/", 1)[0] if "/" in f else "" for f in files
            if f.endswith(("sae_weights.safetensors", "sae.safetensors", "params.safetensors",
                           "params.npz"))}
    if not dirs:
        raise HubError(f"hub repo {repo_id!r} holds no SAE folders in a supported format")
    plan = Plan(repo_id, repo_id, None)
    for f in files:
        d = f.rsplit("/", 1)[0] if "/" in f else ""
        if d in dirs and f.rsplit("/", 1)[-1] in (
                "cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.safetensors",
                "config.json", "params.npz"):
            plan.files.append(f)
    return plan


def plan_release(release: str, downloader, layers: str | None = "all", width: str | None = None,
                 l0: str | None = None, positions: str | None = None,
                 ids: list[str] | None = None, directory: dict | None = None) -> Plan:
    gs = re.fullmatch(r"gemma-scope-(2b|9b|27b)-pt-(res|mlp|att)(-canonical)?", release)
    gs2 = re.fullmatch(r"gemma-scope-2-(270m|1b|4b|12b|27b)-(pt|it)(?:-(res|mlp|att))?(-all)?",
                       release)
    if gs:
        repo = f"google/gemma-scope-{gs.group(1)}-pt-{gs.group(2)}"
        layer_list = parse_layers(layers, GS_LAYERS.get(gs.group(1)))
        return _gemmascope_plan(gs, downloader.list_files(repo), layer_list, width, l0)
    if gs2:
        repo = f"google/gemma-scope-2-{gs2.group(1)}-{gs2.group(2)}"
        poss = [p.strip() for p in positions.split(",")] if positions else None
        return _gemmascope2_plan(gs2, downloader.list_files(repo), parse_layers(layers, None),
                                 width, l0, poss)
    if directory is None:
        directory = saelens_directory()
    plan = _saelens_directory_plan(release, downloader.list_files, parse_layers(layers, None), ids,
                                   directory)
    if plan is not None:
        return plan
    if re.fullmatch(r"[\w.-]+/[\w.-]+", release):
        return _raw_repo_plan(release, downloader.list_files(release))
    raise HubError(f"unknown release {release!r}: expected gemma-scope-2b-pt-res[-canonical] "
                   f"(also -mlp, -att; 9b, 27b), gemma-scope-2-270m-pt[-res|-mlp|-att][-all], a "
                   f"SAELens release name (with sae_lens installed), or a hub repo 'owner/name'")


def fetch(release: str, out: str | os.PathLike | None = None, layers: str | None = "all",
          width: str | None = None, l0: str | None = None, positions: str | None = None,
          mirror: str | None = None, overwrite: bool = False, ids: list[str] | None = None,
          directory: dict | None = None) -> Pack:
    """Download the chosen files of a release and write them as a saeflow pack at `out`.

    ids: SAELens SAE ids within a release (e.g. blocks.8.hook_resid_pre). directory: a SAELens
    release directory to use instead of the installed sae_lens one.
    """
    dl = get_downloader(mirror)
    plan = plan_release(release, dl, layers, width, l0, positions, ids, directory)
    if not plan.files:
        raise HubError(f"nothing to fetch for {release!r} with layers={layers}")
    out = Path(out) if out else cache_dir("packs") / release.replace("/", "--")
    # Stage the chosen files (symlinks) in their repo layout, read them as a pack, convert.
    stage = Path(tempfile.mkdtemp(prefix="saeflow-fetch-"))
    try:
        for f in plan.files:
            src = dl.download(plan.repo_id, f)
            dst = stage / plan.repo_id / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(src).resolve(), dst)
        # The plan already chose one file per slot, so no variant selection here.
        pack = load_pack(stage, position=plan.position)
        for slot, np_id in plan.neuronpedia.items():
            if slot in pack.entries and not pack.entries[slot].extra.get("neuronpedia_id"):
                pack.entries[slot].extra["neuronpedia_id"] = np_id
        pack.model_name = pack.model_name or plan.model_name
        prov = {"release": release, "repo_id": plan.repo_id, "files": plan.files,
                "converted_from": f"hub:{plan.repo_id}"}
        return convert_pack(pack, out, n_layers=plan.n_layers, overwrite=overwrite,
                            provenance=prov, progress=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
