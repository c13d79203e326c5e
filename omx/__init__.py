"""omx — a distributed, Ollama-compatible model runtime.

The package root holds only what every layer shares: the exception tree
(:mod:`omx.errors`), typed identifiers (:mod:`omx.types`) and the protocols
that lower layers consume and upper layers implement (:mod:`omx.protocols`).
The layers themselves live in ``omx.storage``, ``omx.mesh``, ``omx.functions``,
``omx.runtime`` and ``omx.cli``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
