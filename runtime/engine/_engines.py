"""Engines: backends that start :class:`ProcessRunner` subprocesses."""

from __future__ import annotations

import importlib.util
from typing import Any

from omx.errors import ConfigError
from omx.protocols import ModelSpec
from omx.runtime.engine._process import ProcessRunner

__all__ = ["BACKENDS", "CTransformersEngine", "LlamaCppEngine", "make_engine"]


class _SubprocessEngine:
    name = ""
    _backend = ""

    def __init__(self, num_thread: int | None = None, *, load_timeout: float = 300.0,
                 token_timeout: float = 600.0, python: str | None = None,
                 env: dict[str, str] | None = None, verbose: bool = False, batching: bool = True,
                 prefill_chunk: int | None = None, num_gpu: int | None = None, kv_unified: bool = False,
                 max_sequences: int | None = None) -> None:
        self.num_thread = num_thread
        self.num_gpu = num_gpu
        """GPU layers when a spec leaves ``num_gpu`` at -1; None: as many as fit in free VRAM."""
        self.batching = batching
        """llama-cpp: serve parallel requests from one context by continuous batching (False: one context each)."""
        self.prefill_chunk = prefill_chunk
        """Most prompt tokens one decode step takes while other requests generate (None: the runner's default)."""
        self.kv_unified = kv_unified
        """llama-cpp with batching: one KV cache shared by all sequences, requests admitted by its room."""
        self.max_sequences = max_sequences
        """With ``kv_unified``: most requests decoded together per model (None: 4 × the spec's num_parallel)."""
        self.load_timeout = load_timeout
        self.token_timeout = token_timeout
        self.python = python
        self.env = env
        self.verbose = verbose

    def runner_config(self, spec: ModelSpec) -> dict[str, Any]:
        """The ``load`` frame sent to the runner for ``spec``."""
        threads = spec.num_thread if spec.num_thread is not None else self.num_thread
        return {
            "backend": self._backend,
            "model_path": str(spec.model_path),
            "adapters": [str(p) for p in spec.adapter_paths],
            "n_ctx": spec.num_ctx,
            "n_batch": spec.num_batch,
            "n_threads": threads,
            "n_gpu_layers": spec.num_gpu if spec.num_gpu >= 0 else (-1 if self.num_gpu is None else self.num_gpu),
            "n_parallel": max(1, spec.num_parallel),
            "use_mmap": spec.use_mmap,
            "verbose": self.verbose,
            "batching": self.batching,
            "prefill_chunk": self.prefill_chunk,
            "kv_unified": self.kv_unified,
            "n_seq_max": self.max_sequences,
        }

    async def start(self, spec: ModelSpec) -> ProcessRunner:
        """Start a runner subprocess for ``spec`` and wait until its model is loaded."""
        return await ProcessRunner.spawn(spec, self.runner_config(spec), python=self.python,
                                         load_timeout=self.load_timeout, token_timeout=self.token_timeout,
                                         env=self.env)


class LlamaCppEngine(_SubprocessEngine):
    """llama-cpp-python in runner subprocesses (the default backend).

    ``num_thread`` applies when a spec leaves ``num_thread`` unset; None lets
    llama-cpp-python choose (half the CPUs). With ``batching`` (the default) a
    runner serves its parallel slots as sequences of one context decoded
    together; without it, each slot is a context of its own with that many
    threads. ``num_gpu`` (None: estimate) is the layer count offloaded when a
    spec leaves ``num_gpu`` at -1.
    """

    name = "llama-cpp"
    _backend = "llama-cpp"


class CTransformersEngine(_SubprocessEngine):
    """ctransformers in runner subprocesses; needs the optional ``ctransformers`` package."""

    name = "ctransformers"
    _backend = "ctransformers"

    def __init__(self, num_thread: int | None = None, **kwargs: Any) -> None:
        if importlib.util.find_spec("ctransformers") is None:
            raise ConfigError("the ctransformers backend needs the 'ctransformers' package "
                              "(pip install 'omx[ctransformers]')", key="engine.backend")
        super().__init__(num_thread, **kwargs)


BACKENDS: dict[str, type[_SubprocessEngine]] = {
    "llama-cpp": LlamaCppEngine,
    "llama.cpp": LlamaCppEngine,
    "llama_cpp": LlamaCppEngine,
    "llamacpp": LlamaCppEngine,
    "ctransformers": CTransformersEngine,
}


def make_engine(backend: str, **kwargs: Any) -> LlamaCppEngine | CTransformersEngine:
    """Build the engine named ``backend`` (``llama-cpp`` or ``ctransformers``)."""
    cls = BACKENDS.get(backend.strip().lower())
    if cls is None:
        raise ConfigError(f"unknown engine backend {backend!r}; choose 'llama-cpp' or 'ctransformers'",
                          key="engine.backend")
    return cls(**kwargs)  # type: ignore[return-value]
