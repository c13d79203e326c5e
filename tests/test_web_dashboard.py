"""The web dashboard in a real browser (Debian's headless Chromium driven by Playwright) against real nodes.

A 2-node cluster (real Serf) with the tiny generated model on A; the page is A's
web listener. Each test checks that the page logs no console error and that every
request it makes (HTTP and WebSocket) goes to A's web origin. The tests run in
file order on one cluster: the chat and traffic run while A alone holds the model,
then a factor change made in the page replicates it, a third node joins
(it appears without reload) and is killed with ``kill -9`` (it shows failed), and
last a fourth node with a small ``replication.max_bandwidth`` pulls a few-MiB model
through its page slowly enough to watch the progress. The cluster's nodes store in
64 KiB chunks, so a transfer advances chunk by chunk.
Screenshots of each view go to ``$OMX_TEST_ARTIFACTS/web`` (else a temp folder).
Playwright's own browser download is never used: ``executable_path`` is Debian's.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_TEMPLATE
from tests.support.cluster import Cluster, start_cluster
from tests.support.node import NodeProcess, create_model, start_node, wait_until
from tests.support.transfer import write_big_gguf

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = "tiny:latest"
DEADLINE_MS = 40_000
API_KEY = "dash-key-7"
CHUNK = {"OMX_MODELS__CHUNK_SIZE": "65536"}


def _require_browser() -> Any:
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is not installed (Debian package 'chromium')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A Chromium context with a fresh profile (nothing downloaded: Debian's binary)."""
    sync_api = _require_browser()
    profile = tempfile.mkdtemp(prefix="omx-chromium-")
    try:
        with sync_api.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS,
                                                           headless=True, viewport={"width": 1280, "height": 800})
            context.set_default_timeout(DEADLINE_MS)
            sync_api.expect.set_options(timeout=DEADLINE_MS)
            yield context
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("web") / "nodes", 2, env=CHUNK)
    try:
        with c[0].client() as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE,
                         parameters={"temperature": 0, "seed": 42, "num_ctx": 256, "num_predict": 24})
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("OMX_TEST_ARTIFACTS")
    out = Path(root) / "web" if root else tmp_path_factory.mktemp("web-screens")
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Watched:
    """A page with what it logged and asked for."""

    page: Any
    origin: str
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def check(self) -> None:
        ws_origin = "ws" + self.origin.removeprefix("http")
        foreign = [u for u in self.urls if not (u.startswith(self.origin + "/") or u.startswith(ws_origin + "/"))]
        assert not foreign, f"requests left the node: {foreign}"
        assert self.urls, "the page made no request"
        assert not self.errors, f"console errors: {self.errors}"


def open_page(browser: Any, origin: str) -> Watched:
    page = browser.new_page()
    watched = Watched(page, origin)
    page.on("console", lambda m: watched.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: watched.errors.append(str(e)))
    page.on("request", lambda r: watched.urls.append(r.url))
    page.on("websocket", lambda ws: watched.urls.append(ws.url))
    page.goto(origin + "/")
    return watched


def node_row(page: Any, node_id: str) -> Any:
    return page.locator(f'#nodes-body tr[data-node-id="{node_id}"]')


def test_cluster_view_lists_both_nodes_live(browser: Any, cluster: Cluster, shots: Path) -> None:
    from playwright.sync_api import expect

    a, b = cluster[0], cluster[1]
    w = open_page(browser, a.web_url)
    page = w.page
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()
    table = page.get_by_role("table", name="Nodes")
    expect(table.get_by_role("columnheader", name="Status")).to_be_visible()
    for node in (a, b):
        row = node_row(page, node.node_id)
        expect(row.locator("td").first).to_have_text("alive")
        expect(row).to_contain_text(f"{node.host}:8080")
    expect(node_row(page, a.node_id)).to_contain_text(MODEL)
    page.screenshot(path=str(shots / "cluster.png"))
    w.check()
    page.close()


def test_chat_streams_a_reply_with_timings_and_the_serving_node(browser: Any, cluster: Cluster,
                                                                shots: Path) -> None:
    from playwright.sync_api import expect

    a = cluster[0]
    w = open_page(browser, a.web_url)
    page = w.page
    page.get_by_role("tab", name="Chat").click()
    expect(page.get_by_role("combobox", name="Model").locator(f'option[value="{MODEL}"]')).to_have_count(1)
    page.get_by_role("combobox", name="Model").select_option(MODEL)
    page.get_by_role("textbox", name="Message").fill("hello there")
    page.get_by_role("button", name="Send").click()
    log = page.get_by_role("log", name="Conversation")
    expect(log.locator(".msg.user")).to_have_text("userhello there")
    timings = page.locator("#chat-timings")
    expect(timings).to_contain_text("tokens/s")
    assert "time to first token" in timings.inner_text()
    assert timings.get_attribute("data-node") == a.node_id  # A alone holds the model
    reply = log.locator(".msg.assistant .text").inner_text()
    assert reply.strip(), "the reply is empty"
    with a.client() as client:  # the same reply the API gives (temperature 0, fixed seed)
        r = client.post("/api/chat", json={"model": MODEL, "stream": False,
                                           "messages": [{"role": "user", "content": "hello there"}]})
    assert r.json()["message"]["content"] == reply
    page.screenshot(path=str(shots / "chat.png"))
    page.get_by_role("tab", name="Cluster").click()
    expect(node_row(page, a.node_id).locator("td").nth(8)).to_contain_text(MODEL)  # loaded now, on the next tick

    page.get_by_role("tab", name="Traffic").click()
    row = page.get_by_role("table", name="Traffic").locator("tbody tr").filter(has_text=MODEL)
    expect(row).to_have_count(1)
    requests = int(row.locator("td").nth(4).inner_text())
    assert requests >= 1
    expect(page.locator("#chart-requests svg path")).not_to_have_count(0)
    page.screenshot(path=str(shots / "traffic.png"))
    w.check()
    page.close()


SHOUT = """\
from omx.functions import function, Context


@function(timeout=10, memory_mb=256, concurrency=2)
async def shout(body: dict, ctx: Context) -> dict:
    ctx.log("shouting", body["text"])
    return {"text": body["text"].upper()}
"""


def test_functions_view_lists_a_deployed_function_with_its_calls_and_logs(browser: Any, cluster: Cluster,
                                                                          shots: Path) -> None:
    from playwright.sync_api import expect

    a, b = cluster[0], cluster[1]
    with a.client() as client:
        r = client.post("/api/functions", json={"filename": "shout.py", "source": SHOUT}, timeout=60)
        assert r.status_code == 201, r.text
        version = r.json()["functions"][0]["version"]
        for word in ("alpha", "beta", "gamma"):
            assert client.post("/fn/shout", json={"text": word}, timeout=60).json() == {"text": word.upper()}
    w = open_page(browser, a.web_url)
    page = w.page
    page.get_by_role("tab", name="Functions").click()
    table = page.get_by_role("table", name="Functions")
    expect(table.get_by_role("columnheader", name="Calls")).to_be_visible()
    row = page.locator('#functions-body tr[data-function="shout"]')
    expect(row.locator("td").nth(0)).to_have_text("shout")
    expect(row.locator("td").nth(1)).to_have_text(version[:12])
    expect(row.locator("td").nth(2)).to_have_text("/fn/shout")
    expect(row.locator("td").nth(4)).to_have_text("3")  # calls
    expect(row.locator("td").nth(5)).to_have_text("0")  # errors
    expect(row.locator("td").nth(6)).to_contain_text("ms")
    # B fetched it from A and serves it too
    expect(row.locator("td").nth(3)).to_have_attribute("data-nodes", re.compile(rf"\b{b.node_id}\b"))
    page.get_by_role("button", name="Logs of shout").click()
    logs = page.get_by_role("log", name="Logs of shout")
    for word in ("alpha", "beta", "gamma"):
        expect(logs).to_contain_text(f"shouting {word}")
    page.screenshot(path=str(shots / "functions.png"))
    w.check()
    page.close()


def test_models_view_sets_the_factor_and_shows_the_new_replica(browser: Any, cluster: Cluster,
                                                               shots: Path) -> None:
    from playwright.sync_api import expect

    a, b = cluster[0], cluster[1]
    w = open_page(browser, a.web_url)
    page = w.page
    page.get_by_role("tab", name="Models").click()
    row = page.locator(f'#models-body tr[data-model="{MODEL}"]')
    expect(row.locator("td").nth(3)).to_have_text("1")  # replicas
    field = page.get_by_role("spinbutton", name=f"Factor of {MODEL}")
    field.fill("2")
    # The table is redrawn every second: a redraw keeps the factor being typed, and the field's focus.
    drawn = row.element_handle()
    page.wait_for_function("row => !row.isConnected", arg=drawn, timeout=10_000)
    expect(field).to_have_value("2")
    expect(field).to_be_focused()
    page.get_by_role("button", name=f"Set factor of {MODEL}").click()

    def placed() -> dict[str, Any]:
        return next(m for m in a.get("/api/distributed/models")["models"] if m["name"] == MODEL)

    wait_until(lambda: placed()["factor"] == 2, timeout=20, what="the factor set in the page to reach the API")
    expect(row.locator("td").nth(3)).to_have_text("2")  # B got its copy; the table follows without reload
    expect(row.locator("td").nth(5)).to_contain_text(b.node_id)
    assert set(placed()["nodes"]) == {a.node_id, b.node_id}
    page.screenshot(path=str(shots / "models.png"))
    w.check()
    page.close()


def test_traffic_and_load_of_the_other_node_show_on_this_nodes_page(browser: Any, cluster: Cluster,
                                                                    shots: Path) -> None:
    """B (a holder since the factor change) serves requests sent to it directly: A's page charts them
    under B, and lists the model B loaded with B's in-flight and queued counts (from B's load reports)."""
    from playwright.sync_api import expect

    a, b = cluster[0], cluster[1]
    w = open_page(browser, a.web_url)
    page = w.page
    page.get_by_role("tab", name="Traffic").click()
    with b.client() as client:
        # A unloads the model; once B knows it, B (equally cold, and local) serves what it is sent.
        with a.client() as a_client:
            assert a_client.post("/api/generate", json={"model": MODEL, "keep_alive": 0}).status_code == 200

        def a_unloaded_as_b_knows() -> bool:
            return bool(b.nodes()[a.node_id]["loaded"] == [])

        wait_until(a_unloaded_as_b_knows, timeout=20, what="B to learn that A unloaded the model")
        for _ in range(3):
            r = client.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False}, timeout=60)
            assert r.headers["x-omx-node"] == b.node_id
    row = page.locator(f'#traffic-body tr[data-node-id="{b.node_id}"][data-model="{MODEL}"]')
    expect(row.locator("td").nth(4)).to_have_text("3")  # B's requests, counted by B, sampled through A
    assert int(row.locator("td").nth(5).inner_text()) > 0  # and the tokens B generated
    page.screenshot(path=str(shots / "traffic-nodes.png"))
    page.get_by_role("tab", name="Cluster").click()
    cells = node_row(page, b.node_id).locator("td")
    expect(cells.nth(8)).to_contain_text(MODEL)  # loaded on B, as B's load report says
    expect(cells.nth(9)).to_have_text(re.compile(r"^\d+$"))  # in flight: a fresh number, not "—"
    expect(cells.nth(10)).to_have_text(re.compile(r"^\d+$"))  # queued
    w.check()
    page.close()


def test_pull_from_peers_and_delete_in_the_page(browser: Any, cluster: Cluster, tiny_gguf: Path, shots: Path) -> None:
    """On B's dashboard: pull a model only A holds (it comes from A, no registry), delete it (from both), and
    migrate another from A to B."""
    from playwright.sync_api import expect

    a, b = cluster[0], cluster[1]
    with a.client() as client:
        create_model(client, "webpull", tiny_gguf, template=TINY_TEMPLATE)
    w = open_page(browser, b.web_url)
    page = w.page
    page.get_by_role("tab", name="Models").click()
    row = page.locator('#models-body tr[data-model="webpull:latest"]')
    expect(row.locator("td").nth(3)).to_have_text("1")
    page.get_by_role("textbox", name="Pull model").fill("webpull")
    page.get_by_role("button", name="Pull", exact=True).click()
    expect(page.locator("#pull-status")).to_have_text("success")
    expect(row.locator("td").nth(3)).to_have_text("2")
    expect(row.locator("td").nth(5)).to_contain_text(b.node_id)
    page.screenshot(path=str(shots / "models-pulled.png"))
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete webpull:latest").click()
    expect(row).to_have_count(0)  # gone from both nodes
    for node in (a, b):
        assert "webpull:latest" not in {m["name"] for m in node.get("/api/tags")["models"]}

    with a.client() as client:
        create_model(client, "webmove", tiny_gguf, template=TINY_TEMPLATE)
    moved = page.locator('#models-body tr[data-model="webmove:latest"]')
    expect(moved.locator("td").nth(5)).to_have_text(a.node_id)
    page.get_by_role("button", name="Migrate webmove:latest").click()
    dialog = page.get_by_role("dialog", name="Migrate webmove:latest")
    expect(dialog.get_by_label("From node")).to_have_value(a.node_id)
    dialog.get_by_label("To node").select_option(b.node_id)
    dialog.get_by_role("button", name="Migrate").click()
    expect(moved.locator("td").nth(5)).to_have_text(b.node_id)  # the copy moved from A to B
    w.check()
    page.close()


def test_fifty_nodes_and_two_hundred_models_render_and_stay_usable(browser: Any, cluster: Cluster,
                                                                   shots: Path) -> None:
    """The views fed with many entries (members through the page's own event path, models through the API
    route answered by the test) list them all, and the page still answers the keyboard."""
    from playwright.sync_api import expect

    a = cluster[0]
    nodes = [{"id": f"omx-{i:08x}", "name": f"n{i}", "status": ("alive", "suspect", "failed", "left")[i % 4],
              "address": f"10.0.{i // 250}.{i % 250}:8080", "p2p_address": None, "models": [f"m{i}:latest"],
              "model_sizes": {}, "inventory_version": "", "resources": {"cpu": 0.5, "memory": 0.25, "disk": 0.1},
              "self": False, "last_change": "2026-01-01T00:00:00Z"} for i in range(50)]
    models = [{"name": f"m{i}:latest", "replicas": 1, "factor": 2, "nodes": [nodes[i % 50]["id"]],
               "total_size": 1000 * i, "status": "under_replicated"} for i in range(200)]
    w = open_page(browser, a.web_url)
    page = w.page
    page.route("**/api/distributed/models", lambda route: route.fulfill(json={"models": models}))
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()
    page.evaluate("""async (nodes) => {
        const view = await import("/ui/cluster.js");
        for (const node of nodes) view.applyEvent({type: "member", change: "join", node});
    }""", nodes)
    expect(page.locator("#nodes-body tr")).to_have_count(50 + 2)  # and the cluster's own two
    expect(node_row(page, nodes[2]["id"]).locator("td").first).to_have_text("failed")
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(shots / "cluster-phone.png"))
    page.set_viewport_size({"width": 1280, "height": 800})
    page.get_by_role("tab", name="Cluster").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Models")).to_be_focused()
    expect(page.get_by_role("tab", name="Models")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#models-body tr")).to_have_count(200)
    expect(page.locator('#models-body tr[data-model="m199:latest"]')).to_contain_text(nodes[199 % 50]["name"])
    page.screenshot(path=str(shots / "models-many.png"))
    w.check()
    page.close()


def test_joining_node_appears_and_killed_node_shows_failed(browser: Any, cluster: Cluster) -> None:
    from playwright.sync_api import expect

    a = cluster[0]
    w = open_page(browser, a.web_url)
    page = w.page
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()
    c = cluster.add_node("C")
    row = node_row(page, c.node_id)
    expect(row.locator("td").first).to_have_text("alive")  # appeared without reload
    c.kill9()
    expect(row.locator("td").first).to_have_text("failed")
    w.check()
    page.close()


def test_a_slow_pull_shows_its_progress_and_ends_in_the_models_table(browser: Any, cluster: Cluster,
                                                                     tmp_path: Path, shots: Path) -> None:
    """A node that receives at 256 KiB/s pulls a 2 MiB model from A through its page: the pull's bar and
    the Transfers row are seen part-way, then the model is listed as held by that node."""
    from playwright.sync_api import expect

    a = cluster[0]
    with a.client() as client:
        create_model(client, "slowpull", write_big_gguf(tmp_path / "slow.gguf", 2 * 2**20, seed=3))
    d = cluster.add_node("D", env={**CHUNK, "OMX_REPLICATION__MAX_BANDWIDTH": "256KiB"})
    w = open_page(browser, d.web_url)
    page = w.page
    page.get_by_role("tab", name="Models").click()
    row = page.locator('#models-body tr[data-model="slowpull:latest"]')
    expect(row.locator("td").nth(3)).to_have_text("1")
    page.get_by_role("textbox", name="Pull model").fill("slowpull")
    page.get_by_role("button", name="Pull", exact=True).click()
    page.wait_for_function("""() => {
        const part = (bar) => bar && bar.max > 1 && bar.value > 0 && bar.value < bar.max;
        const pull = document.getElementById("pull-progress");
        const rows = [...document.querySelectorAll("#transfers-body tr")];
        const moving = rows.find((tr) => tr.textContent.startsWith("slowpull:latest")
            && tr.cells[3].textContent === "running" && part(tr.querySelector("progress")));
        return !pull.hidden && part(pull) && moving !== undefined;
    }""", timeout=DEADLINE_MS)
    assert page.locator("#pull-status").inner_text().startswith("pulling ")
    page.screenshot(path=str(shots / "models-pull-progress.png"))
    expect(page.locator("#pull-status")).to_have_text("success")
    expect(page.locator("#pull-progress")).to_be_hidden()
    expect(row.locator("td").nth(3)).to_have_text("2")
    expect(row.locator("td").nth(5)).to_contain_text(d.node_id)
    placed = {m["name"]: m for m in d.get("/api/distributed/models")["models"]}
    assert set(placed["slowpull:latest"]["nodes"]) == {a.node_id, d.node_id}
    w.check()
    page.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("web-keyed"),
                      env={"OMX_SECURITY__API_KEYS": f'["{API_KEY}"]', "OMX_P2P__PROFILE": "local"})
    try:
        yield proc
    finally:
        proc.stop()


def test_with_api_keys_the_page_asks_for_one_and_then_works(browser: Any, keyed: NodeProcess,
                                                            shots: Path) -> None:
    from playwright.sync_api import expect

    origin = f"http://127.0.0.1:{keyed.info['web_port']}"
    assert httpx.get(origin + "/api/distributed/status", timeout=10).status_code == 401
    w = open_page(browser, origin)
    page = w.page
    dialog = page.get_by_role("dialog", name="API key")
    expect(dialog).to_be_visible()
    page.screenshot(path=str(shots / "api-key.png"))
    dialog.get_by_label("API key").fill(API_KEY)
    dialog.get_by_role("button", name="Use key").click()
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()  # the event WebSocket took the key
    expect(node_row(page, keyed.info["node_id"]).locator("td").first).to_have_text("alive")
    assert page.evaluate("sessionStorage.getItem('omx.apiKey')") == API_KEY
    # Only the refused first requests (before the key) may have logged errors, all of them 401s.
    assert all("401" in e for e in w.errors), w.errors
    w.errors.clear()
    page.get_by_role("tab", name="Models").click()
    expect(page.locator("#models-body")).to_be_attached()
    w.check()
    page.close()


def test_web_disabled_means_no_listener_and_no_url(tmp_path_factory: pytest.TempPathFactory) -> None:
    node = start_node(tmp_path_factory.mktemp("web-off"), env={"OMX_WEB__ENABLED": "false"})
    try:
        assert node.info["web_port"] is None
        with node.client() as client:
            status = client.get("/api/distributed/status").json()
        assert status["node"]["services"]["web"] is None and status["integration_stats"]["web"] is None
    finally:
        node.stop()
