"""Faults on a real node: runner killed mid-generation, a full queue, a disconnecting client."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import TINY_TEMPLATE
from tests.support.node import NodeProcess, create_model, start_node, wait_until

pytestmark = pytest.mark.e2e

LONG = {"temperature": 0, "num_predict": 200, "num_ctx": 256}


@pytest.fixture(scope="module")
def small_queue_node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[NodeProcess]:
    node = start_node(tmp_path_factory.mktemp("faults"),
                      env={"OMX_ENGINE__MAX_QUEUE": "1", "OMX_ENGINE__NUM_PARALLEL": "1",
                           "OMX_ENGINE__NUM_CTX": "256"})
    try:
        with node.client() as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE)
            # A context far past the training length: generations long enough to interrupt for sure.
            client.post("/api/create", json={"model": "tiny-long", "from": "tiny", "parameters": {"num_ctx": 8192},
                                             "stream": False}).raise_for_status()
        yield node
    finally:
        node.stop()


def runner_pids(node: NodeProcess) -> list[int]:
    procs = psutil.Process(node.proc.pid).children(recursive=True)
    return [p.pid for p in procs if "omx.runtime.engine.runner" in " ".join(p.cmdline())]


def _load(node: NodeProcess, client: httpx.Client, model: str = "tiny") -> int:
    """Load ``model`` alone (unloading any other) and return its runner's pid."""
    for row in client.get("/api/ps").json()["models"]:
        client.post("/api/generate", json={"model": row["name"], "prompt": "", "keep_alive": 0})
    wait_until(lambda: not runner_pids(node), what="other runners to exit")
    r = client.post("/api/generate", json={"model": model, "prompt": "", "keep_alive": -1})
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    pids = wait_until(lambda: runner_pids(node), what="a runner process")
    assert len(pids) == 1
    return pids[0]


def _scheduler(node: NodeProcess) -> dict[str, int]:
    with node.client() as client:
        return client.get("/api/distributed/status").json()["scheduler_stats"]


def test_full_queue_answers_503_with_retry_after(small_queue_node: NodeProcess) -> None:
    with small_queue_node.client() as client:
        runner = _load(small_queue_node, client)
        os.kill(runner, signal.SIGSTOP)  # the running request now holds its slot
        results: list[int] = []
        try:
            def request() -> None:
                with small_queue_node.client() as c:
                    results.append(c.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                                 "options": {"num_predict": 2}}).status_code)

            first = threading.Thread(target=request)
            first.start()
            wait_until(lambda: _scheduler(small_queue_node)["active_requests"] == 1, what="the slot to be held")
            second = threading.Thread(target=request)
            second.start()
            wait_until(lambda: _scheduler(small_queue_node)["queued_requests"] == 1, what="the second request to queue")
            busy = client.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False})
            assert busy.status_code == 503
            assert busy.json()["error"] and "Retry-After" in busy.headers
        finally:
            os.kill(runner, signal.SIGCONT)
        first.join(60)
        second.join(60)
        assert results == [200, 200]


def test_runner_killed_mid_generation_fails_cleanly_then_recovers(small_queue_node: NodeProcess) -> None:
    with small_queue_node.client() as client:
        runner = _load(small_queue_node, client)
        lines: list[dict[str, object]] = []
        with client.stream("POST", "/api/generate", json={"model": "tiny", "prompt": "the cat", "options": LONG}) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            lines.append(json.loads(next(it)))
            os.kill(runner, signal.SIGKILL)
            lines.extend(json.loads(line) for line in it if line)
        assert "error" in lines[-1] and "runner" in str(lines[-1]["error"])
        assert not any(line.get("done") for line in lines)
        again = client.post("/api/generate", json={"model": "tiny", "prompt": "the cat", "stream": False,
                                                   "options": {"temperature": 0, "num_predict": 5}})
        assert again.status_code == 200 and again.json()["eval_count"] == 5
        assert runner not in runner_pids(small_queue_node)


def test_client_disconnect_stops_generation_in_the_runner(small_queue_node: NodeProcess) -> None:
    def runner_row() -> dict[str, object]:
        with small_queue_node.client() as c:
            rows = c.get("/api/distributed/status").json()["runner_stats"]["runners"]
        return next(r for r in rows if r["model"] == "tiny-long:latest")

    with small_queue_node.client() as client:
        runner = _load(small_queue_node, client, "tiny-long")
        assert runner_row()["pid"] == runner
        before = int(runner_row()["cancelled_generations"])
        body = {"model": "tiny-long", "prompt": "the cat", "options": {"temperature": 0, "num_predict": 8000}}
        with client.stream("POST", "/api/generate", json=body) as r:
            assert json.loads(next(r.iter_lines()))["done"] is False
            # Paused, the runner cannot finish on its own before the client hangs up.
            os.kill(runner, signal.SIGSTOP)
        os.kill(runner, signal.SIGCONT)
    wait_until(lambda: int(runner_row()["cancelled_generations"]) == before + 1, timeout=30,
               what="the runner to report the generation cancelled")
    assert _scheduler(small_queue_node)["active_requests"] == 0
