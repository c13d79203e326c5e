"""Inference engines: each loaded model runs in its own runner subprocess.

``make_engine("llama-cpp")`` (or ``"ctransformers"``) builds an
:class:`omx.protocols.Engine`; its ``start(spec)`` returns a
:class:`ProcessRunner` implementing :class:`omx.protocols.Runner`. A crash in
native code kills only the runner; its requests fail with
:class:`omx.errors.RunnerCrashed`.
"""

from __future__ import annotations

from omx.runtime.engine._engines import BACKENDS, CTransformersEngine, LlamaCppEngine, make_engine
from omx.runtime.engine._process import ProcessRunner

__all__ = ["BACKENDS", "CTransformersEngine", "LlamaCppEngine", "ProcessRunner", "make_engine"]
