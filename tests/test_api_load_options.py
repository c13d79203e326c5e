"""Load options a request may set are bounded before a runner is started with them.

Found by fuzzing the API from its OpenAPI document: ``num_thread: 100000`` crashed the
runner (SIGSEGV), ``num_batch: 0`` and ``num_ctx: 1000000000`` failed the load with a 500.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.node import NodeProcess

pytestmark = pytest.mark.e2e


def _generate(node: NodeProcess, options: dict[str, Any]) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello", "stream": False, "options": {"num_predict": 2, **options}}
    return httpx.post(node.url + "/api/generate", json=body, timeout=120)


@pytest.mark.parametrize("options,message", [
    ({"num_thread": 100000}, "num_thread must be between 0 (the default) and 1024"),
    ({"num_thread": -1}, "num_thread must be between 0 (the default) and 1024"),
    ({"num_batch": 0}, "num_batch must be positive"),
    ({"num_ctx": 0}, "num_ctx must be positive"),
])
def test_out_of_range_load_options_are_400(node: NodeProcess, options: dict[str, Any], message: str) -> None:
    r = _generate(node, options)
    assert r.status_code == 400 and r.json() == {"error": message}


def test_a_context_past_the_trained_length_is_cut_to_it(node: NodeProcess) -> None:
    r = _generate(node, {"num_ctx": 1_000_000_000, "num_batch": 1_000_000_000})
    assert r.status_code == 200, r.text
    assert r.json()["eval_count"] == 2
    loaded = httpx.get(node.url + "/api/ps", timeout=30).json()["models"]
    assert [m["context_length"] for m in loaded if m["name"] == "tiny:latest"] == [256]
