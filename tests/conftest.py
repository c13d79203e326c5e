from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node import NodeProcess, create_model, start_node
from tests.support.tiny_gguf import write_tiny_llama

# pytest-xdist's workers carry LINES=24 and COLUMNS=80, which Rich (and other terminal code) would
# take over the real size of the pseudo-terminals the CLI tests open.
for _name in ("LINES", "COLUMNS"):
    os.environ.pop(_name, None)

TINY_TEMPLATE = (
    "{{ if .System }}<s>{{ .System }}</s>{{ end }}{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:"
)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=7)


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[NodeProcess]:
    """One real node for the session, holding the model ``tiny`` (a generated llama GGUF)."""
    proc = start_node(tmp_path_factory.mktemp("node-home"), env={"OMX_ENGINE__NUM_CTX": "256"})
    try:
        with proc.client() as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE,
                         parameters={"temperature": 0, "seed": 42, "num_ctx": 256})
        yield proc
    finally:
        proc.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``soak`` run only when ``-m`` names them (``scripts/soak.sh``), never in the default run."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]
