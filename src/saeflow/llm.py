"""One client for the OpenAI-compatible chat endpoints saeflow talks to (feature explanations,
the steering judge): the standard library's urllib, retries on 429 / 5xx / timeouts, and errors
that name the option to fix."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from saeflow.configs import setting
from saeflow.errors import ExplainError


@dataclass
class LLMEndpoint:
    url: str = setting(help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    model: str = setting(help="the model name the endpoint expects")
    api_key: str | None = setting(None, "sent as a Bearer token when set")
    timeout_s: float = setting(60.0, "seconds to wait for one answer")
    retries: int = setting(3, "retries on 429, 5xx and timeouts")

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ExplainError(f"the LLM URL must start with http:// or https://, got "
                               f"{self.url!r} (e.g. http://127.0.0.1:8000/v1)")
        if not self.model:
            raise ExplainError("name the endpoint's model (--llm MODEL)")


def post_chat(cfg: LLMEndpoint, payload: dict) -> dict:
    """POST `payload` to {url}/chat/completions; retried on 429, 5xx and timeouts."""
    url = cfg.url.rstrip("/") + "/chat/completions"
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    for attempt in range(cfg.retries + 1):
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            if e.code in (401, 403):
                raise ExplainError(f"{url} refused the request (HTTP {e.code}): check the API key "
                                   f"(--api-key-env names the variable that holds it). {detail}"
                                   ) from None
            if (e.code == 429 or e.code >= 500) and attempt < cfg.retries:
                time.sleep(min(2.0 ** attempt, 10.0))
                continue
            raise ExplainError(f"{url} answered HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise ExplainError(f"could not reach the explainer at {url} ({e.reason}); check "
                               f"--llm-url and that the server is running") from None
        except (TimeoutError, OSError) as e:
            if attempt < cfg.retries:
                continue
            raise ExplainError(f"the explainer at {url} did not answer in {cfg.timeout_s:.0f} s "
                               f"({e})") from None
        except json.JSONDecodeError:
            raise ExplainError(f"{url} did not return JSON; is it an OpenAI-compatible API "
                               f"(the URL usually ends in /v1)?") from None
    raise AssertionError("unreachable")
