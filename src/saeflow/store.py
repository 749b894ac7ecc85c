"""On-disk plumbing shared by every stage: the cache directory, atomic writes, file hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # numpy loads only when an npz is written: importing the store stays light
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (or folder) made by tempfile the mode an ordinary open() would have: mkstemp
    makes 0600 files and mkdtemp 0700 folders, which left packs unreadable to other users."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer that takes a path (pyarrow,
    pandas, matplotlib); on success it replaces `path` in one rename, on error it is deleted.
    Readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: never half-written."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never half-written."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_parquet_atomic(table, path: str | os.PathLike) -> None:
    """Write a pyarrow table to `path` through a temp file and a rename: all or nothing."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


# --- several files published together ---------------------------------------------------------
# A stage that writes several files (tables and the manifest that names them) must never leave
# a mix of old and new ones. Each file is first written complete under a staging name; one
# atomic write of a journal then commits the set, and the renames follow. A kill before the
# journal leaves the old set (the staged files are swept later); a kill after it is finished by
# `recover_files` on the next open or write, which completes the renames: old or new, never a
# mix.
JOURNAL = ".publish.json"


def publish_files(root: str | os.PathLike, files: dict[str, Callable[[Path], object]]) -> None:
    """Write every file of `files` ({name in root: writer(path)}) and publish them together;
    the last name is renamed last (put the manifest there)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover_files(root)
    staged: dict[str, str] = {}
    try:
        for name, write in files.items():
            with atomic_path(root / f".{name}.staged") as tmp:
                write(tmp)
            staged[name] = f".{name}.staged"
    except BaseException:
        for stage in staged.values():
            with contextlib.suppress(FileNotFoundError):
                (root / stage).unlink()
        raise
    write_json_atomic(root / JOURNAL, {"renames": staged})  # the commit point
    recover_files(root)


def recover_files(root: str | os.PathLike) -> None:
    """Finish a publication a kill interrupted after its commit point; sweep staged files of
    one interrupted before it. Cheap when there is nothing to do (one stat)."""
    root = Path(root)
    journal = root / JOURNAL
    if journal.is_file():
        try:
            renames = json.loads(journal.read_text())["renames"]
        except (OSError, ValueError, KeyError):
            renames = {}  # a journal is written atomically: unreadable means not ours
        for name, stage in renames.items():
            if (root / stage).exists():
                os.replace(root / stage, root / name)
        journal.unlink()
    for stray in root.glob(".*.staged") if root.is_dir() else ():
        stray.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success rename it to `final`, on error delete it.

    Readers never see a half-written directory: it either is complete or does not exist.
    """
    final = Path(final)
    sweep_dir_leftovers(final)  # copies a killed writer left (a whole pack, say)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite/--force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    normal_mode(tmp, directory=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers (safetensors) make 0600 files
            normal_mode(path, directory=path.is_dir())
        replace_dir_atomic(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir_atomic(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder `new` at `final`, replacing what was there.

    A folder cannot be swapped in one rename, so the old one is first renamed aside as
    `.NAME.old-*`; a kill between the two renames leaves that copy and no `final`, which
    `sweep_dir_leftovers` puts back (and which a rerun of the writer replaces)."""
    new, final = Path(new), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


def sweep_dir_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `final` left beside it: staging copies (`.NAME.*.tmp`)
    and replaced copies (`.NAME.old-*`); an old copy comes back first when `final` itself is
    missing (a kill between replace_dir_atomic's renames). Returns the paths removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    olds = sorted(final.parent.glob(f".{final.name}.old-*"))
    if olds and not final.exists():
        os.rename(olds.pop(), final)
    # atomic_dir's staging folders: mkdtemp's 8 random characters between name and suffix
    gone = olds + sorted(p for p in final.parent.glob(f".{final.name}.{'?' * 8}.tmp")
                         if p.is_dir())
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return gone


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
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # numpy>=2.1 stub: **kwds could bind its allow_pickle flag; arrays never has that key
        np.savez(f, **arrays)  # type: ignore[arg-type]


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
