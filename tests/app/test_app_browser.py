"""The web app in a real browser: headless Debian Chromium driven by Playwright, against the app
served by uvicorn over a small real run. Screenshots go to build/test-artifacts/screenshots/."""
import os
import shutil
from pathlib import Path

import httpx
import pytest

CHROMIUM = os.environ.get("SAEFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="needs Debian's chromium (make test installs it)")


@pytest.fixture(scope="module")
def page(live_server):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors
        yield pg
        browser.close()
    assert not errors, errors


def _points(page, div="#graph"):
    return page.locator(f"{div} .scatterlayer .trace:last-child path.point")


def _api_nodes(url, **params) -> int:
    return len(httpx.get(f"{url}/api/trace", params=params).json()["nodes"])


def test_flow_view_slider_and_click_through(page, live_server):
    seed = "1/resid_post/3"
    page.goto(f"{live_server}/#flow/{seed}")
    page.wait_for_selector("#graph[data-node-count]")
    n = int(page.get_attribute("#graph", "data-node-count"))
    # by default MLP/attention links use each layer's own threshold (no t_mod in the request)
    assert n == _api_nodes(live_server, feature=seed, t_res=0.5)
    assert _points(page).count() == n  # every node is drawn
    assert "per layer" in page.inner_text("#flow-status")
    assert page.is_checked("#t-mod-auto")
    page.screenshot(path=str(SHOTS / "flow_default.png"))

    # both thresholds to 0: the graph grows to what the API traces at 0 / 0
    page.locator("#t-res").fill("0")
    page.locator("#t-mod").fill("0")
    want = _api_nodes(live_server, feature=seed, t_res=0, t_mod=0)
    assert want > n
    page.wait_for_function(f"document.querySelector('#graph').dataset.nodeCount === '{want}'")
    assert _points(page).count() == want
    assert "t_res 0.00" in page.inner_text("#flow-status")
    assert not page.is_checked("#t-mod-auto")  # moving the slider sets one value for all layers
    page.screenshot(path=str(SHOTS / "flow_thresholds_0.png"))

    # click a node that is not the seed: its feature page opens
    pt = _points(page).nth(0)
    box = pt.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#feature-title")
    title = page.inner_text("#feature-title")
    assert page.url.split("#feature/")[1] in title
    assert page.locator("#contexts .ctx").count() >= 1  # top contexts, highlighted
    page.wait_for_selector("#hist .main-svg")
    page.screenshot(path=str(SHOTS / "feature_page.png"), full_page=True)


def test_steering_playground_shows_two_completions(page, live_server):
    page.goto(f"{live_server}/#steer/1/mlp_out/3")
    page.fill("#steer-form [name=strength]", "60")
    page.fill("#steer-form [name=n]", "2")
    page.fill("#steer-form [name=max_new_tokens]", "8")
    page.fill("#steer-prompt", "hello world")
    page.click("#steer-run")
    page.wait_for_selector("#out-steered[data-done='1']", timeout=60_000)
    default = page.locator("#out-default .sample").all_inner_texts()
    steered = page.locator("#out-steered .sample").all_inner_texts()
    assert len(default) == len(steered) == 2
    assert all(t.startswith("hello world") and len(t) > len("hello world") for t in default + steered)
    assert default != steered
    assert "done" in page.inner_text("#steer-status")
    page.screenshot(path=str(SHOTS / "steering.png"), full_page=True)
    # an absurd request is refused with the server's message
    page.fill("#steer-form [name=strength]", "1000")
    page.click("#steer-run")
    page.wait_for_function("document.querySelector('#steer-status').classList.contains('error')")
    assert "64" in page.inner_text("#steer-status")


def test_layers_and_prompt_views(page, live_server):
    page.goto(f"{live_server}/#layers")
    page.wait_for_selector("#classes-plot .main-svg")
    assert "null" in page.inner_text("#classes-caption")  # the classes name their thresholds
    page.wait_for_selector("#groups-plot .main-svg")  # empirical groups beside the classes
    page.wait_for_selector("#sankey .main-svg")
    page.wait_for_selector("#comm-graph[data-node-count]")
    assert int(page.get_attribute("#comm-graph", "data-node-count")) > 0
    assert page.locator("#pt-table tr").count() >= 2
    page.screenshot(path=str(SHOTS / "layers.png"), full_page=True)

    page.goto(f"{live_server}/#prompt")
    page.fill("#prompt-text", "hello world again")
    page.click("#prompt-form button")
    page.wait_for_selector("#prompt-graph[data-node-count]")
    n_tokens = page.locator("#prompt-tokens span").count()
    assert n_tokens >= 3
    assert page.locator("#prompt-table tr").count() == 1 + 9  # one row per SAE
    page.locator("#prompt-tokens span").nth(1).click()
    page.wait_for_selector("#prompt-tokens span.sel >> nth=0")
    page.wait_for_function("document.querySelector('#prompt-tokens span:nth-child(2)')"
                           ".classList.contains('sel')")
    page.screenshot(path=str(SHOTS / "prompt.png"), full_page=True)


def test_search_box_finds_a_feature(page, live_server):
    page.goto(f"{live_server}/#flow")
    page.wait_for_selector("#graph[data-node-count]")  # the suggested first feature
    page.fill("#search", "2/resid_post/4")
    page.wait_for_selector("#search-results a")
    page.click("#search-results a >> nth=0")
    page.wait_for_function("location.hash === '#flow/2/resid_post/4'")
    page.wait_for_function("document.querySelector('#flow-feature').value === '2/resid_post/4'")
