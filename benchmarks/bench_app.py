"""Page-load time of the flow view in a real browser, for a large graph against a small one.

    .venv/bin/python benchmarks/bench_app.py runs/embedded [--nodes 2000]

Starts `saeflow serve`'s app in uvicorn on 127.0.0.1, opens the flow view in headless Debian
chromium (Playwright) and times navigation -> graph drawn (the page sets data-node-count when
plotly has rendered). The large graph is the union of many seeds' flow graphs at thresholds 0
with 5 modules per node, grown until it has --nodes nodes; the baseline is one seed's graph at
the default thresholds, measured in the same run. Also reports the /api/trace time alone.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_server(run: str) -> tuple[str, object]:
    import uvicorn

    from saeflow.app.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def seeds_for(url: str, want: int, first: str) -> tuple[list[str], int]:
    """Seeds (resid_post features of the middle layers) until the union has >= want nodes."""
    info = httpx.get(f"{url}/api/info").json()
    layers = info["layers"]
    seeds, n = [], 0
    f = int(first.split("/")[-1])
    i = 0
    while n < want and i < 400:
        L = layers[(len(layers) // 2 + i) % len(layers)]
        seeds.append(f"{L}/resid_post/{(f + 37 * i) % info['slots'][f'{L}/resid_post']}")
        i += 1
        if i % 4 == 0:
            r = httpx.get(f"{url}/api/trace", params={"feature": ",".join(seeds), "t_res": 0,
                                                      "t_mod": 0, "mod_k": 5,
                                                      "max_nodes": 5000}, timeout=120)
            n = len(r.json()["nodes"])
    return seeds, n


def page_load(page, url: str, hash_: str, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        page.goto("about:blank")
        t0 = time.perf_counter()
        page.goto(f"{url}/#{hash_}")
        page.wait_for_selector("#graph[data-node-count]", timeout=120_000)
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    url, server = start_server(args.run)
    first = httpx.get(f"{url}/api/info").json()["first_feature"]
    seeds, n = seeds_for(url, args.nodes, first)
    big_q = {"feature": ",".join(seeds), "t_res": 0, "t_mod": 0, "mod_k": 5, "max_nodes": 5000}
    api_times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        g = httpx.get(f"{url}/api/trace", params=big_q, timeout=120).json()
        api_times.append(time.perf_counter() - t0)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        small = page_load(page, url, f"flow/{first}", args.reps)
        n_small = int(page.get_attribute("#graph", "data-node-count"))
        big = page_load(page, url, f"flow/{','.join(seeds)}?t_res=0&t_mod=0&mod_k=5",
                        args.reps)
        n_big = int(page.get_attribute("#graph", "data-node-count"))
        drawn = page.evaluate("window.saeflow.timings.flow")
        out = Path("build/bench")
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / "flow_large.png"))
        browser.close()
    server.should_exit = True
    med = statistics.median
    print(f"run {args.run}: large graph {n_big} nodes / {len(g['links'])} links from "
          f"{len(seeds)} seeds; small graph {n_small} nodes")
    print(f"  /api/trace (large), median of {args.reps}: {med(api_times):.3f} s")
    print(f"  page load to drawn graph, median of {args.reps}: small {med(small):.3f} s, "
          f"large {med(big):.3f} s, ratio {med(big) / med(small):.2f}x")
    print(f"  last large load in the page: fetch {drawn['fetch_ms']:.0f} ms, draw "
          f"{drawn['draw_ms']:.0f} ms; screenshot build/bench/flow_large.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
