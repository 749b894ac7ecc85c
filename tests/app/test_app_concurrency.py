"""Many requests at once through the real app (uvicorn, a thread pool): every answer equals the
one the same request gets alone. Hooks are scoped to the call that installed them, so a capture
or an edit of one request never fires in another's forward (issue 30)."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx

TEXTS = ["The cat sat on the mat", "hello world again", "one two three four", "a b c d e"]


def _requests() -> list[tuple[str, str, dict]]:
    """16 mixed requests: (kind, path, body or query)."""
    steer = [{"prompt": p, "feature": f, "strength": s, "n": 2, "max_new_tokens": 6,
              "seed": i, "kind": k}
             for i, (p, f, s, k) in enumerate([
                 ("hello", "1/resid_post/3", 8, "add"), ("the cat", "2/resid_post/5", -6, "add"),
                 ("a b c", "0/mlp_out/7", 0, "rescale"), ("xyz", "2/attn_out/1", 5, "add")])]
    reqs: list[tuple[str, str, dict]] = []
    reqs += [("post", "/api/activations", {"text": t, "top_k": 4}) for t in TEXTS]
    reqs += [("post", "/api/activations", {"text": t, "top_k": 2, "token": 1}) for t in TEXTS[:2]]
    reqs += [("post", "/api/steer", s) for s in steer]
    reqs += [("stream", "/api/steer/stream", s) for s in steer[:2]]
    reqs += [("get", "/api/features/1/resid_post/3", {}), ("get", "/api/features/2/mlp_out/4", {}),
             ("get", "/api/trace", {"feature": "1/resid_post/3", "t_res": 0, "t_mod": 0}),
             ("get", "/api/dashboard/0/resid_post/2", {})]
    assert len(reqs) == 16
    return reqs


def _call(c: httpx.Client, kind: str, path: str, body: dict):
    try:
        return _send(c, kind, path, body)
    except httpx.HTTPError as e:  # a broken connection counts as a wrong answer
        return 0, repr(e)


def _send(c: httpx.Client, kind: str, path: str, body: dict):
    if kind == "get":
        r = c.get(path, params=body)
    elif kind == "post":
        r = c.post(path, json=body)
    else:  # the stream's final result (token events interleave by timing, the result does not)
        with c.stream("POST", path, json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        return r.status_code, events[-1]
    is_json = r.headers.get("content-type", "").startswith("application/json")
    return r.status_code, r.json() if is_json else r.text


def test_sixteen_mixed_concurrent_requests_equal_their_solo_answers(live_server):
    reqs = _requests()
    with httpx.Client(base_url=live_server, timeout=120) as c:
        alone = [_call(c, *r) for r in reqs]
    assert all(status == 200 for status, _ in alone), [a for a in alone if a[0] != 200]
    differ = []
    for _ in range(2):  # twice: the interleaving differs from run to run
        with ThreadPoolExecutor(16) as ex, httpx.Client(base_url=live_server, timeout=120) as c:
            together = list(ex.map(lambda r: _call(c, *r), reqs))
        differ += [(r[1], b[0], str(b[1])[:200]) for r, a, b in zip(reqs, alone, together)
                   if b != a]
    assert not differ, f"{len(differ)} of {2 * len(reqs)} differ from their solo answer: {differ}"
