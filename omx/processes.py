"""Processes of a node: the environment its children start with, and how a process is recognised.

A node's environment may hold the cluster secret (``OMX_CLUSTER_SECRET``), API
keys (``OMX_SECURITY__API_KEYS``, ``OMX_API_KEY``) and whatever else its
operator exported. Its children (runners, where llama.cpp parses untrusted
GGUF files, and the Serf agent) inherit none of it: :func:`child_env` builds
their environment from an allowlist, and never passes an ``OMX_`` variable.

A pid alone does not name a process once it has exited, since the kernel
reuses pids; the pid with :func:`start_ticks` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

__all__ = ["HARMLESS_HOME", "child_env", "start_ticks"]

HARMLESS_HOME = "/nonexistent"
"""``HOME`` for children: Debian's home for accounts that must not have one, so nothing is read from it."""

_ALWAYS_KEPT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def child_env(*, keep: Iterable[str] = (), keep_prefixes: Iterable[str] = (),
              extra: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: an allowlist of ``environ`` (default ``os.environ``).

    Kept: ``PATH``, the locale (``LANG``, ``LC_ALL``, ``LC_CTYPE``), ``TZ``,
    ``TMPDIR``, the names in ``keep`` and those starting with one of
    ``keep_prefixes``, never one starting with ``OMX_``. ``HOME`` is
    :data:`HARMLESS_HOME`. ``extra`` is added last, as given.
    """
    source = os.environ if environ is None else environ
    names = {*_ALWAYS_KEPT, *keep}
    prefixes = tuple(keep_prefixes)
    env = {name: value for name, value in source.items()
           if (name in names or name.startswith(prefixes)) and not name.startswith("OMX_")}
    env.setdefault("PATH", os.defpath)
    env["HOME"] = HARMLESS_HOME
    env.update(extra or {})
    return env


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None when unknown (gone, or not Linux).

    Field 22 of ``/proc/<pid>/stat``: unlike a wall-clock start time, it never
    moves when the clock is set, so equal values mean the same process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    try:
        # The command name (field 2) may hold spaces and parentheses; fields after it start at field 3.
        return int(stat[stat.rindex(b")") + 2:].split()[22 - 3])
    except (ValueError, IndexError):
        return None
