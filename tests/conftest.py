import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures import FAMILIES, make_model_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Unit tests never touch the user's cache; integration tests share it (the de-quantised
    embedded model is built once per machine, not once per test)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SAEFLOW_HUB_MIRROR", raising=False)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: make_model_dir(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs):
    from saeflow import load_model

    # SAEFLOW_TEST_DEVICE=cuda runs the model tests on a GPU (never required).
    device = os.environ.get("SAEFLOW_TEST_DEVICE", "cpu")
    return {f: load_model(str(d), device=device) for f, d in tiny_model_dirs.items()}
