"""Writes that a kill cannot leave half done (issue 30): a kill (a simulated exception) at
any point between the writes of a stage leaves the old result or the new one, never a mix,
and files get ordinary permissions."""
import errno
import os
import shutil
import stat

import pytest

import saeflow.store as store
from saeflow.store import (
    JOURNAL,
    atomic_dir,
    atomic_path,
    publish_files,
    recover_files,
    write_text_atomic,
)

NAMES = ("edges.parquet", "features.parquet", "stats.json")


class Killed(Exception):
    pass


def _set(root, tag):
    return {n: (lambda path, n=n: path.write_text(f"{tag}:{n}")) for n in NAMES}


def _state(root):
    texts = {(root / n).read_text() for n in NAMES}
    tags = {t.split(":")[0] for t in texts}
    assert len(tags) == 1, f"a mix of old and new: {texts}"
    return tags.pop()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_kill_at_every_point_of_a_publication_leaves_old_or_new(tmp_path, monkeypatch):
    """Kill points: inside each file's writer, and before each rename (the staged files' and
    the publication's own)."""
    real_replace = os.replace
    tried = 0
    outcomes = set()
    for point in range(1, 20):
        root = tmp_path / f"k{point}"
        publish_files(root, _set(root, "old"))
        calls = [0]

        def replace(a, b, point=point):
            calls[0] += 1
            if calls[0] == point:
                raise Killed
            return real_replace(a, b)

        new = _set(root, "new")
        if point >= 10:  # a kill inside the writer of file (point - 10)
            i = point - 10
            if i >= len(NAMES):
                break
            name = NAMES[i]

            def dying(path, name=name):
                path.write_text("new:" + name[:2])  # part of the file, then the kill
                raise Killed
            new[name] = dying
        else:
            monkeypatch.setattr(store.os, "replace", replace)
        try:
            publish_files(root, new)
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(store.os, "replace", real_replace)
        if finished and point < 10 and calls[0] < point:
            continue  # fewer renames than this point: nothing more to try
        tried += 1
        recover_files(root)  # what the next open does
        outcomes.add(_state(root))
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert tried == 10 and outcomes == {"old", "new"}  # 7 renames + 3 writers


def test_open_stats_finishes_an_interrupted_publication(tmp_path):
    from saeflow.evolution.tables import STATS_MANIFEST, open_stats

    root = tmp_path / "run" / "stats"
    root.mkdir(parents=True)
    (root / "edges.parquet").write_text("old")
    (root / ".edges.parquet.staged").write_text("new")
    (root / f".{STATS_MANIFEST}.staged").write_text(
        '{"format": "saeflow-stats", "identity": {}, "pairs": []}')
    (root / JOURNAL).write_text('{"renames": {"edges.parquet": ".edges.parquet.staged", '
                                f'"{STATS_MANIFEST}": ".{STATS_MANIFEST}.staged"}}}}')
    st = open_stats(tmp_path / "run")
    assert st.manifest["format"] == "saeflow-stats" and (root / "edges.parquet").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["edges.parquet", STATS_MANIFEST]


def test_atomic_path_keeps_the_old_file_and_normal_permissions(tmp_path):
    target = tmp_path / "t.parquet"
    write_text_atomic(target, "old")
    with pytest.raises(Killed):
        with atomic_path(target) as tmp:
            tmp.write_text("ne")
            raise Killed
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["t.parquet"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_killed_pack_writes_leave_no_copies(tmp_path):
    """A whole-pack staging copy and a replaced copy left by kills are swept by the next
    write; a copy set aside at the final rename comes back when the pack itself is gone."""
    final = tmp_path / "pack"
    with atomic_dir(final) as d:
        (d / "pack.json").write_text("v1")
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~_umask()
    assert stat.S_IMODE((final / "pack.json").stat().st_mode) == 0o666 & ~_umask()
    (tmp_path / ".pack.abcd1234.tmp").mkdir()  # killed while writing
    (tmp_path / ".pack.abcd1234.tmp" / "w.safetensors").write_bytes(b"x" * 10)
    os.rename(final, tmp_path / ".pack.old-99")  # killed between the two final renames
    store.sweep_dir_leftovers(final)
    assert (final / "pack.json").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["pack"]
    shutil.copytree(final, tmp_path / ".pack.old-7")
    with atomic_dir(final, overwrite=True) as d:
        (d / "pack.json").write_text("v2")
    assert sorted(os.listdir(tmp_path)) == ["pack"] and (final / "pack.json").read_text() == "v2"


def test_plotly_bundle_is_never_truncated(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from saeflow.flow import plots

    fig = go.Figure(go.Bar(x=[1], y=[2]))
    bundle = tmp_path / "plotly.min.js"
    bundle.write_text("truncat")  # what a full disk left before
    real = plots.write_bytes_atomic

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(plots, "write_bytes_atomic", full_disk)
    with pytest.raises(OSError):
        plots.write_html_atomic(fig, tmp_path / "f.html")
    assert not (tmp_path / "f.html").exists() and bundle.read_text() == "truncat"
    monkeypatch.setattr(plots, "write_bytes_atomic", real)
    plots.write_html_atomic(fig, tmp_path / "f.html")
    assert bundle.stat().st_size == len(get_plotlyjs().encode())
    assert sorted(os.listdir(tmp_path)) == ["f.html", "plotly.min.js"]


def test_a_kill_while_writing_communities_keeps_the_old_table(tiny_run, tmp_path, monkeypatch):
    import pandas as pd

    from saeflow.evolution.analyses import write_evolution_outputs
    from saeflow.evolution.tables import open_stats

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    table = run / "stats" / "communities.parquet"
    before = table.read_bytes()

    def dying(self, path, *a, **kw):
        open(path, "wb").write(b"PAR1")  # 4 bytes, then the kill
        raise Killed
    monkeypatch.setattr(pd.DataFrame, "to_parquet", dying)
    with pytest.raises(Killed):
        write_evolution_outputs(run, open_stats(run), tiny_run[1], community_floor=0.05)
    assert table.read_bytes() == before
    assert not [p for p in (run / "stats").rglob(".*") if p.name.endswith(".tmp")]


def test_pack_files_get_normal_permissions(tmp_path):
    from saeflow.saes.packs import save_pack
    from saeflow.saes.sae import random_sae

    pack = save_pack([("resid_post", 0, random_sae(8, 12, "relu", seed=0))], tmp_path / "pack",
                     model_name="t", d_model=8, n_layers=1)
    for path in [pack.root, *pack.root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~_umask()
        assert stat.S_IMODE(path.stat().st_mode) == want, path
