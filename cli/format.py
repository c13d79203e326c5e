"""Human formatting shared by the commands, matching what Ollama's CLI prints.

Pure functions only: sizes ("253 MB"), relative times ("2 minutes ago",
"4 minutes from now", "Forever"), Go-style durations ("1.234s", "523.1ms")
and parameter counts ("3.2B").
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

__all__ = [
    "go_duration",
    "human_bytes",
    "human_duration",
    "human_number",
    "human_time",
    "parse_timestamp",
    "processor",
    "short_digest",
]

_BYTE_UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def human_bytes(size: int) -> str:
    """Decimal units as Ollama prints them: ``253 MB``, ``2.0 GB`` is ``2 GB``, ``1.5 GB``."""
    for unit, scale in _BYTE_UNITS:
        if size >= scale:
            value = size / scale
            if value >= 10 or value == math.trunc(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{size} B"


def human_number(count: int) -> str:
    """Parameter counts as Ollama prints them: ``3212749888`` -> ``3.2B``, ``268098176`` -> ``268.10M``."""
    if count >= 10**9:
        value = count / 10**9
        return f"{value:.0f}B" if value == math.floor(value) else f"{value:.1f}B"
    if count >= 10**6:
        value = count / 10**6
        return f"{value:.0f}M" if value == math.floor(value) else f"{value:.2f}M"
    if count >= 10**3:
        return f"{count / 10**3:.0f}K"
    return str(count)


def human_duration(seconds: float) -> str:
    """A coarse duration: ``Less than a second``, ``About a minute``, ``3 hours``, ``2 weeks``."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 86400 / 365)} years"


def parse_timestamp(value: str | None) -> datetime | None:
    """Parse the RFC 3339 timestamps of the Ollama API (nanosecond fractions allowed)."""
    if not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    # Python accepts at most microseconds: trim longer fractions.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = head + "." + rest[: min(digits, 6)] + rest[digits:]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.year <= 1:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def human_time(when: datetime | None, *, now: datetime, zero: str = "Never") -> str:
    """``2 minutes ago`` / ``4 minutes from now``; far future is ``Forever``."""
    if when is None:
        return zero
    delta = (now - when).total_seconds()
    if delta / 86400 / 365 < -20:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def go_duration(nanoseconds: int | float) -> str:
    """Format nanoseconds as Go's ``time.Duration`` does: ``1.5s``, ``523.1ms``, ``12µs``, ``1m2.5s``."""
    ns = int(nanoseconds)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = f"{_trim(rest / 1_000_000_000)}s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


def short_digest(digest: str) -> str:
    """The 12-hex ID column of ``ollama list``."""
    return digest.removeprefix("sha256:").removeprefix("sha256-")[:12]


def processor(size: int, size_vram: int) -> str:
    """The PROCESSOR column of ``ollama ps``."""
    if size_vram <= 0:
        return "100% CPU"
    if size_vram >= size:
        return "100% GPU"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"
