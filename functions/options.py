"""Ollama options: merging model PARAMETERs with request options, and mapping
them to the engine's :class:`SamplingOptions` and :class:`ModelSpec` fields."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from omx.errors import InvalidRequest
from omx.protocols import SamplingOptions

__all__ = ["LOAD_OPTIONS", "json_grammar", "merge_options", "parse_keep_alive", "sampling_options"]

_INT = {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
        "main_gpu", "num_thread", "mirostat"}
_FLOAT = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
          "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta"}
_BOOL = {"penalize_newline", "numa", "use_mmap", "use_mlock", "low_vram", "f16_kv", "vocab_only", "logits_all"}
_LIST = {"stop"}
LOAD_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock",
                          "numa", "low_vram", "vocab_only"})
_KNOWN = _INT | _FLOAT | _BOOL | _LIST
_SAMPLING_FIELDS = {f.name for f in fields(SamplingOptions)}


def _coerce(key: str, value: Any) -> Any:
    if key in _INT:
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise InvalidRequest(f"option {key!r} must be an integer, got {json.dumps(value)}")
        return int(value)
    if key in _FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequest(f"option {key!r} must be a number, got {json.dumps(value)}")
        return float(value)
    if key in _BOOL:
        if not isinstance(value, bool):
            raise InvalidRequest(f"option {key!r} must be true or false, got {json.dumps(value)}")
        return value
    if key in _LIST:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"option {key!r} must be a list of strings")
        return list(value)
    return value


def merge_options(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge option layers (later wins), validating known keys' types.

    Unknown keys are dropped, as Ollama ignores them with a warning, and so
    are ``null`` values (Ollama skips them: LangChain sends every option it
    knows, unset ones as ``null``).
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is not None and key in _KNOWN:
                merged[key] = _coerce(key, value)
    return merged


def sampling_options(options: Mapping[str, Any], *, grammar: str | None = None) -> SamplingOptions:
    values = {k: v for k, v in options.items() if k in _SAMPLING_FIELDS}
    if "stop" in values:
        values["stop"] = tuple(s for s in values["stop"] if s)
    if values.get("seed") is not None and values["seed"] < 0:
        values["seed"] = None
    return SamplingOptions(**values, grammar=grammar)


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: float | int | str | None) -> float | None:
    """Ollama's ``keep_alive``: seconds as a number, or a Go duration string.

    Returns None for "use the default", 0 for "unload now", a negative number
    for "keep forever".
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidRequest("keep_alive must be a duration such as \"5m\" or a number of seconds")
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidRequest(f"invalid keep_alive duration {value!r} (use e.g. \"5m\", \"1h\", 0 or -1)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def json_grammar(fmt: object) -> str | None:
    """The GBNF grammar for Ollama's ``format``: ``"json"`` or a JSON schema."""
    if fmt is None or fmt == "":
        return None
    from llama_cpp import llama_grammar  # deferred: loads the native library

    if fmt == "json":
        return llama_grammar.JSON_GBNF
    if isinstance(fmt, dict):
        try:
            grammar: str = llama_grammar.json_schema_to_gbnf(json.dumps(fmt))
        except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors on bad schemas
            raise InvalidRequest(f"invalid JSON schema in format: {exc}") from exc
        return grammar
    raise InvalidRequest(f"invalid format {fmt!r}: use \"json\" or a JSON schema object")
