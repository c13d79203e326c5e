"""The one wire time format: RFC 3339 in UTC with microseconds and ``Z``.

Every timestamp omx puts on the wire (``created_at`` of each streamed chunk, ``modified_at``,
``expires_at``, event and status times) is written here. Streamed chunks call it once per
token, so the date part is formatted once a second and reused.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

__all__ = ["iso_time"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_last: tuple[int, str] = (-1, "")
"""The last whole second formatted, and its text (replaced whole, so threads read a matching pair)."""


def iso_time(when: float | datetime | None = None) -> str:
    """``when`` (Unix seconds or an aware datetime; now if ``None``) as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    if when is None:
        micros = time.time_ns() // 1000
    elif isinstance(when, datetime):
        micros = (when - _EPOCH) // _MICROSECOND
    else:
        micros = round(when * 1_000_000)
    global _last
    second, fraction = divmod(micros, 1_000_000)
    last = _last
    if last[0] != second:
        last = _last = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{last[1]}.{fraction:06d}Z"
