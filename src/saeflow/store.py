"""On-disk plumbing shared by every stage: the cache directory, atomic writes, file hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def cache_dir(*parts: str) -> Path:
    """$SAEFLOW_CACHE, else $XDG_CACHE_HOME/saeflow, else ~/.cache/saeflow."""
    root = os.environ.get("SAEFLOW_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saeflow"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_parquet_atomic(table, path: str | os.PathLike) -> None:
    """Write a pyarrow table to `path` through a temp file and a rename: all or nothing."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success rename it to `final`, on error delete it.

    Readers never see a half-written directory: it either is complete or does not exist.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite/--force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- fingerprints ---------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so big packs are hashed once."""
    st = path.stat()
    memo_file = cache_dir("hashes") / "files.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = sha256_file(path)
        write_json_atomic(memo_file, memo)
    return memo[key]


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        # numpy>=2.1 stub: **kwds could bind its allow_pickle flag; arrays never has that key
        np.savez(f, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def open_manifest(run: str | os.PathLike, subdir: str, name: str, fmt: str,
                  error: type[Exception], missing_hint: str) -> tuple[Path, dict]:
    """(RUN/subdir, its manifest) for a finished pass (index, statistics); `error` with a hint
    when RUN has none, or when the manifest is not of format `fmt`."""
    root = Path(run) / subdir
    mf = root / name
    if not mf.is_file():
        raise error(f"{Path(run)} has no {missing_hint}")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != fmt:
        raise error(f"{mf} is not a saeflow {fmt.removeprefix('saeflow-')} manifest")
    return root, manifest


def finished_pass(manifest_file: Path, identity: dict, force: bool, error: type[Exception],
                  what: str) -> bool:
    """Whether `manifest_file` records a finished pass with exactly `identity` (reuse it).

    A pass of another pack in the same place is refused with `error` unless `force`: RUN holds
    the results of one pack. A pass of the same pack with other settings returns False (rerun)."""
    if force or not manifest_file.is_file():
        return False
    old = json.loads(manifest_file.read_text())
    if old.get("identity") == identity:
        return True
    if old.get("identity", {}).get("pack") != identity["pack"]:
        raise error(f"{manifest_file.parent} holds {what} of a different pack; use another "
                    f"--out or --force")
    return False
