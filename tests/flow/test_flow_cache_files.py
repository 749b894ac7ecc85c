"""The flow's match cache is keyed by pack.json's hashes; a pack whose files no longer match
them (a garbage safetensors header, NaN written into the weights) is refused with one clear
line instead of being reported as "reused cached matches" (issue 30)."""
import json
import shutil
import struct

import pytest

from saeflow.cli.main import main
from saeflow.errors import FlowError
from saeflow.flow.compute import run_flow
from saeflow.saes.packs import load_pack, save_pack
from saeflow.saes.sae import random_sae


@pytest.fixture
def pack_and_run(tmp_path):
    saes = [(p, L, random_sae(16, 24, "relu", seed=3 * L + i))
            for L in range(2) for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=16, n_layers=2)
    run_flow(pack, tmp_path / "run", progress=False)  # fills the cache
    return pack.root, tmp_path


def _weights(pack_root):
    return pack_root / "resid_post" / "layer_1" / "sae_weights.safetensors"


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def _nan_data(path):
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n
    data[start:start + 16] = struct.pack("<4f", *[float("nan")] * 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_garbage_header, _nan_data])
def test_a_damaged_pack_is_refused_not_reused(pack_and_run, damage, capsys):
    root, tmp = pack_and_run
    shutil.rmtree(tmp / "run")
    damage(_weights(root))
    with pytest.raises(FlowError, match="is corrupt.*pack inspect"):
        run_flow(load_pack(root), tmp / "run2", progress=False)
    assert main(["flow", str(root), "--out", str(tmp / "run3"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "reused" not in err
    assert not (tmp / "run3" / "flow.json").exists()


def test_an_intact_pack_still_reuses_the_cache(pack_and_run):
    root, tmp = pack_and_run
    run = run_flow(load_pack(root), tmp / "again", progress=False)
    assert run.manifest["reused_cache"]
    assert json.loads((tmp / "again" / "flow.json").read_text())["reused_cache"]
