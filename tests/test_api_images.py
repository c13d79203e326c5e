"""Images are refused with a clear 400, never dropped: omx's runner loads no vision projector.

A model created with a projector layer (a generated ``clip``/``mmproj`` GGUF beside the
tiny llama) advertises ``vision`` as Ollama would, yet every way of sending it an image
(``/api/generate``, ``/api/chat``, OpenAI ``image_url`` parts) gets a 400 naming the
missing projector support instead of an answer written without looking.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest

from tests.support.node import NodeProcess, upload_blob

pytestmark = pytest.mark.e2e

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def _write_projector(path: Path) -> Path:
    """A tiny GGUF that Ollama's create files as a vision projector (architecture ``clip``)."""
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("general.type", "mmproj")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_tensor("mm.0.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def http(node: NodeProcess, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    projector = _write_projector(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf")
    with node.client() as client:
        files = {tiny_gguf.name: upload_blob(client, tiny_gguf), projector.name: upload_blob(client, projector)}
        r = client.post("/api/create", json={"model": "tiny-vision", "files": files, "stream": False})
        assert r.status_code == 200, r.text
        yield client


def test_the_projector_model_advertises_vision(http: httpx.Client) -> None:
    caps = http.post("/api/show", json={"model": "tiny-vision"}).json()["capabilities"]
    assert "vision" in caps and "completion" in caps


@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"prompt": "what is in the picture?", "images": [PNG]}),
    ("/api/chat", {"messages": [{"role": "user", "content": "what is this?", "images": [PNG]}]}),
    ("/api/generate", {"prompt": "what is in the picture?", "images": [PNG], "stream": False}),
])
def test_images_to_a_vision_model_are_refused_naming_the_projector(http: httpx.Client, path: str,
                                                                   body: dict[str, Any]) -> None:
    r = http.post(path, json={"model": "tiny-vision", "options": {"num_predict": 4}, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "projector" in error and "tiny-vision" in error and "cannot read images" in error


def test_openai_image_parts_are_refused_in_openai_shape(http: httpx.Client) -> None:
    content = [{"type": "text", "text": "what is this"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    r = http.post("/v1/chat/completions", json={"model": "tiny-vision", "max_tokens": 4,
                                                "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "projector" in error["message"]


def test_images_to_a_text_model_name_the_missing_projector(http: httpx.Client) -> None:
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "look", "images": [PNG]})
    assert r.status_code == 400
    assert r.json()["error"] == "model 'tiny' does not support image input: it has no vision projector"


def test_the_same_requests_without_images_are_answered(http: httpx.Client) -> None:
    r = http.post("/api/generate", json={"model": "tiny-vision", "prompt": "hello", "images": [], "stream": False,
                                         "options": {"num_predict": 3, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["eval_count"] == 3
    r = http.post("/api/chat", json={"model": "tiny-vision", "stream": False, "options": {"num_predict": 3},
                                     "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"]
