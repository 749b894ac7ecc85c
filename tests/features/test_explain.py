"""LLM explanations through a real OpenAI-compatible HTTP server on localhost (started here)."""
import collections
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from saeflow.cli.main import main
from saeflow.errors import ExplainError
from saeflow.features.explain import ExplainerConfig, explain_features, feature_prompt
from saeflow.features.index import IndexConfig, build_index
from saeflow.features.tables import open_index
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae

KEY = "sk-test-123"


class ChatServer(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions like an OpenAI endpoint. Its "model" reads the marked
    tokens of the prompt and names the most common one, so answers depend on the evidence."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.fail_next = 0  # answer this many requests with HTTP 503 first

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        srv = self.server
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": {"message": "invalid api key"}})
        if srv.fail_next:
            srv.fail_next -= 1
            return self._send(503, {"error": {"message": "busy"}})
        srv.requests.append(payload)
        user = payload["messages"][-1]["content"]
        marked = collections.Counter(re.findall(r"<<(.*?)>>", user))
        word = marked.most_common(1)[0][0].strip() if marked else "nothing"
        self._send(200, {"id": "x", "object": "chat.completion", "model": payload["model"],
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": f"the token '{word}'\nextra"}}]})


@pytest.fixture()
def server():
    srv = ChatServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    root = tmp_path_factory.mktemp("explain")
    pack = save_pack([("resid_post", 1, random_sae(model.d_model, 24, "relu", seed=4))],
                     root / "pack", model_name="tiny", d_model=model.d_model, n_layers=3)
    cfg = IndexConfig(tokens=800, batch_size=4, ctx_len=48, n_top=4, n_samples=2,
                      encoder_dtype="float32")
    build_index(pack, model, root / "run", cfg, progress=False)
    return root / "run"


def test_explanations_come_from_the_evidence(server, run, tmp_path):
    idx = open_index(run)
    cfg = ExplainerConfig(url=server.url, model="judge-1", api_key=KEY, save_every=2)
    out = explain_features(run, cfg, limit=5, progress=False)
    assert len(out) == 5 and len(server.requests) == 5
    for fid, text in out.items():
        L, p, f = fid.split("/")
        row = idx.feature(int(L), p, int(f))
        top = row["examples"][0]
        assert text.startswith("the token '") and "extra" not in text  # first line only
        assert row["explanation"] == text  # shown on the feature page
        # The prompt carried the feature's top contexts and its logit lens.
        prompt = next(r for r in server.requests
                      if r["messages"][-1]["content"].startswith(f"Feature {fid}."))
        assert f"<<{top['tokens'][top['center']]}>>".replace("\n", "\\n") in \
            prompt["messages"][-1]["content"]
        assert "Promoted output tokens" in prompt["messages"][-1]["content"]
    # Searchable by the explanation's words, best first.
    fid, text = next(iter(out.items()))
    word = re.search(r"'(.*)'", text).group(1)
    if word.strip():
        hits = idx.search(word)
        assert any(h["id"] == fid and h["explanation"] == text for h in hits)
    # A second call skips what is done; force asks again.
    explain_features(run, cfg, limit=5, progress=False)
    assert len(server.requests) == 5
    explain_features(run, cfg, features=[fid], force=True, progress=False)
    assert len(server.requests) == 6
    table = pq.read_table(idx.root / "explanations.parquet").to_pandas()
    assert sorted(table.id) == sorted(out) and set(table.llm) == {"judge-1"}


def test_retries_errors_and_cli(server, run, monkeypatch, capsys):
    cfg = ExplainerConfig(url=server.url, model="m", api_key=KEY)
    server.fail_next = 1  # one 503, then success
    explain_features(run, cfg, features=["1/resid_post/3"], force=True, progress=False)
    assert len(server.requests) == 1
    with pytest.raises(ExplainError, match="HTTP 401.*API key"):
        explain_features(run, ExplainerConfig(url=server.url, model="m", api_key="wrong"),
                         features=["1/resid_post/4"], force=True, progress=False)
    with pytest.raises(ExplainError, match="could not reach"):
        explain_features(run, ExplainerConfig(url="http://127.0.0.1:9/v1", model="m", retries=0),
                         features=["1/resid_post/4"], force=True, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        explain_features(run, cfg, features=["1/resid_post/999"], progress=False)
    with pytest.raises(ExplainError, match="http://"):
        ExplainerConfig(url="localhost:8000", model="m")
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    assert main(["explain", str(run), "--llm-url", server.url, "--llm", "m", "--api-key-env",
                 "TEST_LLM_KEY", "--features", "1/resid_post/5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["1/resid_post/5"].startswith("the token")
    assert main(["explain", str(run), "--llm-url", server.url, "--llm", "m", "--api-key-env",
                 "NO_SUCH_VAR", "--features", "1/resid_post/6"]) == 2
    assert "API key" in capsys.readouterr().err
    assert main(["feature", str(run), "1/resid_post/5"]) == 0
    assert "explained: the token" in capsys.readouterr().out


def test_prompt_for_a_silent_feature():
    text = feature_prompt({"id": "3/resid_post/7", "examples": [], "logit_top": []}, 4)
    assert "never fired" in text
