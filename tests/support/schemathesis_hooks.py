"""Schemathesis checks for the fuzz test (loaded through ``SCHEMATHESIS_HOOKS``)."""

from __future__ import annotations

import re
from typing import Any

import schemathesis

_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]+\.py", line \d+|\b\w+Error: .*\n\s+at ')


@schemathesis.check
def no_traceback(ctx: Any, response: Any, case: Any) -> bool | None:
    """A body never carries a Python traceback or a source location."""
    text = response.content.decode("utf-8", errors="replace") if response.content else ""
    if _TRACEBACK.search(text):
        raise AssertionError(f"the response body looks like a traceback: {text[:300]!r}")
    return None
