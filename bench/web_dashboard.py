"""How fast the web dashboard loads on loopback, in Debian's headless Chromium (Playwright drives it).

Starts one node (API, web and gossip ports chosen by the system) and opens its
dashboard ``--rounds`` times, each in a fresh page of one browser profile (the
first round is cold, the rest reuse the HTTP cache as a returning visitor does).
Reported per round and as medians, from the page's own Navigation Timing: the
HTML's response end, DOMContentLoaded, load, and the moment the Cluster table
first shows this node (the page's scripts ran, fetched the API and drew).

    python bench/web_dashboard.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from _node import start_node

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _start_node(home: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    return start_node(home, {"OMX_WEB__PORT": "0"}, ready=lambda info: bool(info.get("web_port")))


def _round(context: Any, url: str, node_id: str) -> dict[str, float]:
    page = context.new_page()
    try:
        page.goto(url, wait_until="load")
        page.wait_for_selector(f'#nodes-body tr[data-node-id="{node_id}"]')
        shown = page.evaluate("performance.now()")
        nav = page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
        entry = json.loads(nav)
        return {"response_end": entry["responseEnd"], "dom_content_loaded": entry["domContentLoadedEventEnd"],
                "load": entry["loadEventEnd"], "cluster_table": shown}
    finally:
        page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="omx-bench-web-"))
    proc, info = _start_node(work / "home")
    url = f"http://127.0.0.1:{info['web_port']}/"
    rows: list[dict[str, float]] = []
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(str(work / "profile"), executable_path=CHROMIUM,
                                                           args=ARGS, headless=True,
                                                           viewport={"width": 1280, "height": 800})
            for i in range(args.rounds):
                row = _round(context, url, str(info["node_id"]))
                rows.append(row)
                print(f"round {i + 1:2d}: " + "  ".join(f"{k} {v:7.1f} ms" for k, v in row.items()))
            context.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print("median  : " + "  ".join(f"{k} {statistics.median(r[k] for r in rows):7.1f} ms" for k in rows[0]))
    warm = rows[1:] or rows
    print("warm med: " + "  ".join(f"{k} {statistics.median(r[k] for r in warm):7.1f} ms" for k in warm[0]))


if __name__ == "__main__":
    main()
