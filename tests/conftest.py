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
def test_device() -> str:
    """SAEFLOW_TEST_DEVICE (default cpu): the device the device-sensitive tests run on."""
    return os.environ.get("SAEFLOW_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs):
    from saeflow import load_model

    # SAEFLOW_TEST_DEVICE=cuda runs the model tests on a GPU (never required).
    device = os.environ.get("SAEFLOW_TEST_DEVICE", "cpu")
    return {f: load_model(str(d), device=device) for f, d in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def tiny_run(tiny_models, tmp_path_factory):
    """A small real RUN (flow, index, statistics) of the tiny Gemma 3 with a random pack."""
    from fixtures import make_tiny_run

    model = tiny_models["gemma3"]
    run, pack = make_tiny_run(model, tmp_path_factory.mktemp("app"))
    return run, pack, model


@pytest.fixture(scope="session")
def live_server(tiny_run):
    """The web app in a real uvicorn server on 127.0.0.1 (a thread), over the tiny run."""
    import socket
    import threading
    import time

    import uvicorn

    from saeflow.app.server import create_app

    run, pack, model = tiny_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(run, loaded_model=model, loaded_pack=pack),
                                           host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)
