"""The bubblewrap command line of a worker, its environment, and whether this machine can run one.

What a worker sees: ``/usr`` (and the ``/bin``, ``/lib``… links to it), the
Python installation and the site-packages that hold orjson, pydantic and the
``omx`` package, all read-only and at their own paths; ``/proc``, a minimal
``/dev``, a private ``/tmp`` (tmpfs, as big as the memory limit) and the
worker script. Nothing else of the host: not ``$OMX_HOME`` (masked by a tmpfs
should it lie inside one of those trees), not the node's working directory.
Every namespace is new, so there is no network. The environment is an
allowlist without any ``OMX_`` variable.

Run by root, bubblewrap needs no user namespace and starts the worker as
root inside the sandbox; the worker drops to a uid of its own before it runs
user code (RLIMIT_NPROC never applies to uid 0, so a fork bomb is contained
only once it has dropped). Run by another user, bubblewrap maps that user to
65534 in a new user namespace, where RLIMIT_NPROC counts the sandbox's own
processes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omx.processes import child_env

__all__ = ["Limits", "bwrap_binary", "probe_sandbox", "sandbox_command", "sandbox_problem",
           "sandbox_problem_async", "worker_env"]

WORKER_PATH = "/omx/worker.py"
_WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_PROBE_TIMEOUT_S = 30.0
_uids = itertools.count()


@dataclass(frozen=True)
class Limits:
    """A worker's resource limits; ``uid`` is the unprivileged uid it runs as when started by root."""

    memory_mb: int
    cpu_s: int
    nproc: int = 32
    uid: int = 65534


def next_uid() -> int:
    """A uid of its own for each worker of this node (RLIMIT_NPROC counts processes per uid)."""
    return 1_000_000 + (os.getpid() % 16384) * 4096 + next(_uids) % 4096


def bwrap_binary() -> str | None:
    return shutil.which("bwrap")


def _code_roots() -> list[str]:
    """The read-only trees a worker needs: the interpreter, its stdlib, and the packages it imports."""
    import orjson

    import omx
    import omx.functions

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    for module in (omx, omx.functions, orjson):
        roots.add(os.path.dirname(os.path.abspath(str(module.__file__))))
    try:
        import pydantic
        import pydantic_core

        roots.update(os.path.dirname(os.path.dirname(os.path.abspath(str(m.__file__))))
                     for m in (pydantic, pydantic_core))
    except ImportError:
        pass
    kept: list[str] = []
    for root in sorted(os.path.abspath(r) for r in roots):
        if root == "/" or root == "/usr" or root.startswith("/usr/"):
            continue
        if any(root == k or root.startswith(k.rstrip("/") + "/") for k in kept):
            continue
        kept.append(root)
    return kept


def _omx_home() -> str:
    from omx.runtime.config import omx_home

    return os.path.abspath(omx_home())


def sandbox_command(limits: Limits, *, bwrap: str = "bwrap", probe: bool = False) -> list[str]:
    """The argv that starts one sandboxed worker."""
    args = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        args += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    args += ["--die-with-parent", "--new-session", "--hostname", "omx-function", "--ro-bind", "/usr", "/usr"]
    for link in _SYSTEM_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(limits.memory_mb * 2**20), "--tmpfs", "/tmp"]
    made = {"/", "/tmp", "/usr", "/proc", "/dev"}
    roots = _code_roots()
    for root in roots:
        parents = list(Path(root).parents)[::-1]
        for parent in map(str, parents):
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", root, root]
    home = _omx_home()
    if any(home.startswith(root.rstrip("/") + "/") for root in roots):
        args += ["--tmpfs", home]  # the node's home never shows, even inside a bound tree
    args += ["--perms", "0755", "--dir", os.path.dirname(WORKER_PATH),
             "--ro-bind", str(_WORKER_SCRIPT), WORKER_PATH, "--chdir", "/tmp"]
    spec = {"memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s, "nproc": limits.nproc,
            "uid": limits.uid, "gid": limits.uid, "probe": probe}
    return [*args, sys.executable, "-I", "-B", WORKER_PATH, json.dumps(spec)]


def worker_env() -> dict[str, str]:
    """A worker's whole environment: the allowlist of :func:`omx.processes.child_env`, nothing of omx."""
    return child_env(extra={"PATH": "/usr/local/bin:/usr/bin:/bin", "TMPDIR": "/tmp", "HOME": "/tmp",
                            "MALLOC_ARENA_MAX": "2", "PYTHONDONTWRITEBYTECODE": "1"},
                     environ={k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "LC_CTYPE", "TZ")})


def probe_sandbox(bwrap: str | None = None) -> str | None:
    """None when a trial worker starts in the sandbox and drops its privileges; else why not."""
    path = shutil.which(bwrap or "bwrap")
    if path is None:
        return ("bubblewrap is not installed (apt install bubblewrap): custom functions run only "
                "in its sandbox, never unsandboxed")
    try:
        result = subprocess.run(sandbox_command(Limits(memory_mb=512, cpu_s=10, uid=next_uid()), bwrap=path,
                                                probe=True),
                                env=worker_env(), stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap ({path}) does not start a sandbox: {exc}"
    if result.returncode == 0:
        return None
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    text = lines[-1] if lines else f"exit status {result.returncode}"
    if "namespace" in text.lower() or "not permitted" in text.lower():
        return (f"bubblewrap ({path}) cannot create a sandbox: {text} (user namespaces are refused here; "
                "allow them, e.g. sysctl kernel.unprivileged_userns_clone=1)")
    return f"bubblewrap ({path}) cannot start a sandboxed worker: {text}"


_problem: list[str | None] = []


async def sandbox_problem_async() -> str | None:
    """:func:`sandbox_problem` without blocking the event loop on its first probe."""
    if _problem:
        return _problem[0]
    return await asyncio.to_thread(sandbox_problem)


def sandbox_problem() -> str | None:
    """Why custom functions cannot run on this machine, or None when they can (probed once, then cached)."""
    if not _problem:
        _problem.append(probe_sandbox())
    return _problem[0]
