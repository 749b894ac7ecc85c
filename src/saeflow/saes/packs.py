"""An SAE family (one SAE per layer and position): discover, inspect, load lazily, save, convert.

A saeflow pack on disk:

    PACK/pack.json                         manifest (model, d_model, n_layers, provenance, hashes)
    PACK/{position}/layer_{L}/cfg.json     SAELens 6.x folder, one per SAE
    PACK/{position}/layer_{L}/sae_weights.safetensors

Any directory of SAELens folders, Gemma Scope npz folders, Gemma Scope 2 folders or a
sparsify run directory is read as a pack too. SAEs are loaded one at a time on demand, so a
family larger than memory can be inspected, converted and matched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import saeflow.saes.formats as fmt
from saeflow._version import __version__
from saeflow.errors import MissingSAEError, PackError
from saeflow.ids import Slot
from saeflow.lm.hookpoints import POSITIONS, check_position, raw_position, written_hook_name
from saeflow.saes.formats import SAEInfo
from saeflow.saes.sae import SAE
from saeflow.store import atomic_dir, file_digest, sha256_file, write_json_atomic

PACK_MANIFEST = "pack.json"
PACK_FORMAT = "saeflow-pack"
PACK_VERSION = 1


def slot_dir(position: str, layer: int) -> str:
    return f"{position}/layer_{layer}"


@dataclass
class Pack:
    root: Path
    entries: dict[Slot, SAEInfo]
    source_format: str  # saeflow, saelens, gemmascope, gemmascope2, sparsify, mixed
    model_name: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    provenance: dict = field(default_factory=dict)
    choices: list[str] = field(default_factory=list)  # notes on variant selection
    refused: list[SAEInfo] = field(default_factory=list)  # SAEs found that saeflow cannot load
    max_cached: int = 8
    _cache: "OrderedDict[Slot, SAE]" = field(default_factory=OrderedDict, repr=False)

    # --- what is in it --------------------------------------------------------------------
    @property
    def positions(self) -> list[str]:
        present = {p for p, _ in self.entries}
        return [p for p in POSITIONS if p in present]

    def layers(self, position: str | None = None) -> list[int]:
        return sorted({L for p, L in self.entries if position is None or p == position})

    def __contains__(self, slot) -> bool:
        return tuple(slot) in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def info(self, position: str, layer: int) -> SAEInfo:
        try:
            return self.entries[Slot(position, layer)]
        except KeyError:
            have = ", ".join(str(Slot.of(s)) for s in sorted(self.entries)[:8])
            raise MissingSAEError(f"the pack at {self.root} has no SAE at {position} layer {layer} "
                           f"(it has {len(self.entries)} SAEs, e.g. {have})") from None

    def missing(self, n_layers: int | None = None,
                positions: Iterable[str] | None = None) -> list[Slot]:
        """Slots absent from the family, over layers 0..n_layers-1."""
        n = n_layers or self.n_layers or (max(self.layers()) + 1 if self.entries else 0)
        poss = list(positions) if positions else self.positions
        return [Slot(p, L) for p in poss for L in range(n) if (p, L) not in self.entries]

    # --- weights --------------------------------------------------------------------------
    def sae(self, position: str, layer: int, device=None, dtype=None) -> SAE:
        """Load one SAE (LRU-cached, at most `max_cached` in memory)."""
        key = Slot(position, layer)
        info = self.info(*key)
        sae = self._cache.get(key)
        if sae is None:
            sae = fmt.load_checked(info)
            sae.metadata.update(position=position, layer=int(layer))
            self._cache[key] = sae
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return sae.to(device=device, dtype=dtype) if (device or dtype) else sae

    def __getitem__(self, slot) -> SAE:
        position, layer = slot
        return self.sae(position, layer)

    def iter_saes(self) -> Iterator[tuple[str, int, SAE]]:
        """Every SAE, one at a time (not kept in the cache)."""
        for slot in sorted(self.entries, key=lambda s: (POSITIONS.index(s.position), s.layer)):
            p, L = slot
            sae = fmt.load_checked(self.entries[slot])
            sae.metadata.update(position=p, layer=L)
            yield p, L, sae

    def verify(self) -> list[str]:
        """Run every check `load` makes on every SAE (configs against tensor headers, dtypes,
        k, pack.json's shapes and hashes, finite weights; one SAE in memory at a time) and
        return the problems, one line each. SAEs that fail move from `entries` to `refused`,
        so `describe()` lists them with their reason."""
        problems = [f"{i.path}: {i.refused}" for i in self.refused]
        for slot, info in sorted(self.entries.items()):
            found = fmt.check_sae(info)
            if found:
                problems += [f"{slot_dir(*slot)}: {m}" for m in found]
                info.refused = "; ".join(found)
                self.refused.append(self.entries.pop(slot))
                self._cache.pop(slot, None)
        return problems

    # --- checks against a model -----------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise a clear error if any SAE does not fit `model` (a LoadedModel)."""
        for (p, L), info in sorted(self.entries.items()):
            if not 0 <= L < model.n_layers:
                raise PackError(f"the pack has an SAE at {p} layer {L}, but {model.name} has layers "
                                f"0..{model.n_layers - 1}; is this pack for another model?")
            want = model.width(p)
            if info.d_in != want:
                what = "n_heads*d_head" if p == "attn_z" else "d_model"
                raise PackError(
                    f"SAE d_in {info.d_in} does not match model {what} {want} at "
                    f"{model.arch.hf_module(p, L)} ({p} layer {L}); this pack was made for a "
                    f"different model{f' ({self.model_name})' if self.model_name else ''}")

    # --- description ----------------------------------------------------------------------
    def describe(self, n_layers: int | None = None) -> dict:
        rows = [self.entries[s].summary() for s in
                sorted(self.entries, key=lambda s: (POSITIONS.index(s[0]), s[1]))]
        for r in rows:
            r["path"] = os.path.relpath(r["path"], self.root)
        n = n_layers or self.n_layers
        return {
            "root": str(self.root),
            "source_format": self.source_format,
            "model": self.model_name,
            "d_model": self.d_model,
            "n_layers": n,
            "positions": self.positions,
            "n_saes": len(self.entries),
            "missing": [{"position": p, "layer": L} for p, L in self.missing(n)],
            "choices": self.choices,
            "refused": [{"path": os.path.relpath(i.path, self.root), "format": i.format,
                         "position": i.position, "layer": i.layer, "why": i.refused}
                        for i in self.refused],
            "provenance": self.provenance,
            "saes": rows,
        }


# --- discovery ------------------------------------------------------------------------------
def load_pack(path: str | os.PathLike, position: str | None = None, width: str | None = None,
              l0: str | None = None, family: str | None = None, seed: int | None = None,
              best: bool = False, strict: bool = True) -> Pack:
    """Open an SAE family from a saeflow pack or a directory in any supported format.

    position: position for SAEs whose files do not say it (Gemma Scope npz outside a
    -res/-mlp/-att folder). width / l0: which variant to take where a layer has several.
    family: the model family (gemma3, llama, ...) for hook names whose site depends on it
    (HF `layers.L.mlp` is mlp_raw under Gemma's post-norm, mlp_out elsewhere); sparsify runs
    say it in config.json when trained from its command line. seed / best: which sparsify
    variant to take in a multi-seed or save_best run (default: the lowest seed, the final
    checkpoint). strict: refuse the whole family when any SAE in it cannot be loaded exactly
    (transcoders, layer_norm inputs, ...); strict=False lists those in `pack.refused`.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no SAE pack at {root}")
    if position:
        check_position(position)
    if (root / PACK_MANIFEST).is_file():
        return _load_saeflow_pack(root)
    infos: list[SAEInfo] = []
    unplaced: list[SAEInfo] = []
    refused: list[SAEInfo] = []
    for folder, kind in _scan(root):
        info = fmt.describe(folder, kind, position, family)
        if position and info.position is None:
            info.position = position
        if info.position is not None:
            info.position = raw_position(info.position, family)
        if info.refused:
            refused.append(info)
            continue
        (infos if info.position is not None and info.layer is not None else unplaced).append(info)
    if refused and strict:
        r = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise PackError(f"{r.path}: {r.refused}{more}; remove it from {root}, or list the family "
                        f"with `saeflow pack inspect` to see every SAE saeflow cannot load")
    if not infos and not unplaced and not refused:
        raise PackError(
            f"no SAEs found under {root}: expected pack.json, SAELens folders (cfg.json + "
            f"sae_weights.safetensors), Gemma Scope params.npz, Gemma Scope 2 params.safetensors "
            f"+ config.json, or sparsify cfg.json + sae.safetensors")
    if unplaced:
        ex = unplaced[0].path
        raise PackError(f"cannot tell the position or layer of {len(unplaced)} SAE(s), e.g. {ex}; "
                        f"pass position= (--position resid_post|mlp_out|attn_out|attn_z)")
    entries, choices = _choose_variants(infos, width, l0, seed, best, root)
    formats = {i.format for i in entries.values()} or {i.format for i in refused}
    models = {i.model_name for i in entries.values() if i.model_name}
    resid = [i.d_in for (p, _), i in entries.items() if p != "attn_z"]
    return Pack(root=root, entries=entries,
                source_format=formats.pop() if len(formats) == 1 else "mixed",
                model_name=models.pop() if len(models) == 1 else None,
                d_model=resid[0] if resid and len(set(resid)) == 1 else None,
                choices=choices, refused=refused)


def _scan(root: Path) -> Iterator[tuple[Path, str]]:
    """Yield (folder, format) for every SAE folder under root (root itself included)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        kind = fmt.detect_format(Path(dirpath), set(filenames))
        if kind is not None:
            yield Path(dirpath), kind


def _l0_key(label: str | None) -> float:
    """Distance of an L0 label from the default choice (L0 ~ 100, or 'medium')."""
    if label is None:
        return 0.0
    named = {"medium": 0, "canonical": 0, "small": 1, "big": 2}
    if label in named:
        return named[label]
    try:
        return abs(float(label) - 100.0)
    except ValueError:
        return 1e9


def _width_value(label: str | None, d_sae: int) -> float:
    if not label:
        return d_sae
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", label.lower())
    if not m:
        return d_sae
    return float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2)]


def _variant_label(c: SAEInfo) -> str:
    if c.format == "sparsify":
        return c.extra.get("variant") or "final"
    return f"width {c.width or c.d_sae}, l0 {c.l0}"


def _choose_variants(infos: list[SAEInfo], width: str | None, l0: str | None,
                     seed: int | None = None, best: bool = False, root: Path | None = None):
    groups: dict[Slot, list[SAEInfo]] = {}
    for info in infos:
        assert info.position is not None and info.layer is not None  # placed by load_pack
        groups.setdefault(Slot(info.position, info.layer), []).append(info)
    entries, choices = {}, []
    for slot, cands in sorted(groups.items()):
        pool = cands
        if width:
            pool = [c for c in pool if c.width == width or str(c.d_sae) == width]
        if l0:
            pool = [c for c in pool if str(c.l0) == str(l0)]
        if seed is not None:
            pool = [c for c in pool if c.extra.get("seed") == seed]
        if best:
            pool = [c for c in pool if c.extra.get("best")]
        elif any(not c.extra.get("best") for c in pool):
            pool = [c for c in pool if not c.extra.get("best")]  # the final checkpoint
        if not pool:
            have = sorted({_variant_label(c) for c in cands})
            asked = ", ".join(f"{k}={v}" for k, v in (("width", width), ("l0", l0),
                                                     ("seed", seed), ("best", best or None)) if v)
            raise PackError(f"no SAE at {slot[0]} layer {slot[1]} matches {asked}; "
                            f"available: {have}")
        pool.sort(key=lambda c: (_width_value(c.width, c.d_sae), _l0_key(c.l0),
                                 c.extra.get("seed") or 0, str(c.path)))
        chosen = pool[0]
        if len(cands) > 1:
            where = os.path.relpath(chosen.path, root) if root else str(chosen.path)
            how = ("--seed N / --best pick another" if chosen.format == "sparsify"
                   else "--width / --l0 pick another")
            choices.append(f"{slot[0]} layer {slot[1]}: chose {where} ({_variant_label(chosen)}) "
                           f"among {len(cands)} variants; {how}")
        entries[slot] = chosen
    return entries, choices


def _load_saeflow_pack(root: Path) -> Pack:
    try:
        manifest = json.loads((root / PACK_MANIFEST).read_text())
    except ValueError as e:
        raise PackError(f"{root / PACK_MANIFEST} is not valid JSON ({e})") from e
    if manifest.get("format") != PACK_FORMAT:
        raise PackError(f"{root / PACK_MANIFEST} is not a saeflow pack manifest")
    entries = {}
    for row in manifest.get("saes", []):
        try:
            p, L = check_position(row["position"]), int(row["layer"])
            info = SAEInfo("saelens", root / row["path"], int(row["d_in"]), int(row["d_sae"]),
                           row["architecture"], row["dtype"], p, L, row.get("hook_name"),
                           manifest.get("model"),
                           extra={"sha256": row.get("sha256"),
                                  "neuronpedia_id": row.get("neuronpedia_id")})
        except KeyError as e:
            raise PackError(f"{root / PACK_MANIFEST}: an SAE entry lacks {e}") from None
        entries[Slot(p, L)] = info
    return Pack(root=root, entries=entries, source_format="saeflow",
                model_name=manifest.get("model"), d_model=manifest.get("d_model"),
                n_layers=manifest.get("n_layers"), provenance=manifest.get("provenance", {}))


# --- writing --------------------------------------------------------------------------------
def save_pack(saes: Iterable[tuple[str, int, SAE]], out: str | os.PathLike, *,
              model_name: str | None, d_model: int | None, n_layers: int | None,
              provenance: dict | None = None, overwrite: bool = False,
              sae_provenance: dict[Slot, dict] | None = None,
              neuronpedia_ids: dict[Slot, str] | None = None,
              progress: bool = False) -> Pack:
    """Write SAEs (consumed one at a time) as a saeflow pack, atomically."""
    from tqdm.auto import tqdm

    out = Path(out)
    rows = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for position, layer, sae in tqdm(saes, desc="writing pack", disable=not progress,
                                         unit="sae"):
            slot = Slot(position, layer)
            rel = slot_dir(position, layer)
            np_id = (neuronpedia_ids or {}).get(slot)
            extra = {"neuronpedia_id": np_id} if np_id else None
            hook = written_hook_name(position, layer)
            fmt.save_saelens(sae, tmp / rel, position=position, layer=layer, hook_name=hook,
                             model_name=model_name, extra_metadata=extra,
                             provenance=(sae_provenance or {}).get(slot))
            rows.append({"position": position, "layer": layer, "path": rel, "d_in": sae.d_in,
                         "d_sae": sae.d_sae, "architecture": sae.architecture,
                         "dtype": str(sae.dtype).removeprefix("torch."),
                         "hook_name": hook,
                         "neuronpedia_id": np_id,
                         "sha256": sha256_file(tmp / rel / fmt.SAELENS_WEIGHTS)})
        positions = [p for p in POSITIONS if any(r["position"] == p for r in rows)]
        manifest = {
            "format": PACK_FORMAT, "version": PACK_VERSION, "model": model_name,
            "d_model": d_model, "n_layers": n_layers, "positions": positions,
            "provenance": {"saeflow_version": __version__,
                           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           **(provenance or {})},
            "saes": rows,
        }
        write_json_atomic(tmp / PACK_MANIFEST, manifest)
    return _load_saeflow_pack(out)


def convert_pack(src: Pack, out: str | os.PathLike, *, model_name: str | None = None,
                 n_layers: int | None = None, overwrite: bool = False,
                 provenance: dict | None = None, progress: bool = False) -> Pack:
    """Write any pack as a saeflow pack (one SAE in memory at a time)."""
    for (p, L), info in sorted(src.entries.items()):
        if info.architecture == "groupmax":  # refuse before anything is written
            raise PackError(f"{info.path}: a GroupMax SAE ({p} layer {L}) has no SAELens form, so "
                            f"it cannot be converted; use the sparsify run as it is")
    np_ids: dict[Slot, str] = {
        s: i.extra["neuronpedia_id"] for s, i in src.entries.items()
              if i.extra.get("neuronpedia_id")}
    prov = {"converted_from": str(src.root), "source_format": src.source_format,
            **({"choices": src.choices} if src.choices else {}),
            **({"source_provenance": src.provenance} if src.provenance else {}),
            **(provenance or {})}
    per_sae = {s: {"converted_from": os.path.relpath(i.path, src.root),
                   "source_format": i.format} for s, i in src.entries.items()}
    return save_pack(src.iter_saes(), out, model_name=model_name or src.model_name,
                     d_model=src.d_model, n_layers=n_layers or src.n_layers, provenance=prov,
                     overwrite=overwrite, neuronpedia_ids=np_ids, progress=progress,
                     sae_provenance=per_sae)


def pack_fingerprint(pack) -> str:
    """Content hash of the pack's SAEs (the manifest's hashes where it has them)."""
    parts = []
    for slot in sorted(pack.entries):
        info = pack.entries[slot]
        digest = info.extra.get("sha256")
        if not digest:
            files = sorted(p for p in Path(info.path).iterdir() if p.is_file()) \
                if Path(info.path).is_dir() else [Path(info.path)]
            digest = hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()
        parts.append([slot[0], slot[1], digest])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
