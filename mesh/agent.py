"""Supervise a real ``serf agent`` child process.

The child gets its own session (so its own process group), an environment of
its own (nothing of the node's, see :func:`omx.processes.child_env`) and
``PR_SET_PDEATHSIG`` so it dies with the node. A crash is answered by a
restart with exponential backoff (the snapshot file lets the new agent rejoin
the members it knew); an intended :meth:`SerfAgent.leave` or
:meth:`SerfAgent.stop` is not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from omx.mesh.agent_config import AgentConfig, AgentState, _free_loopback_port, _write_private_json
from omx.mesh.errors import SerfAgentError, SerfConnectionError, SerfRPCError
from omx.mesh.serf_rpc import SerfRPC
from omx.mesh.tags import encode_tags
from omx.processes import child_env

__all__ = ["SerfAgent"]

log = logging.getLogger(__name__)

# Exits when the node died before setpriv armed PR_SET_PDEATHSIG, else becomes the agent (same pid).
_EXEC_IF_PARENT = 'test "$PPID" = "$1" || exit 70; shift; exec "$@"'


def _die_with_parent_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` behind ``setpriv --pdeathsig KILL`` (util-linux), so the agent dies with the node.

    This replaces a ``preexec_fn``, which Python documents as unsafe in a
    threaded process. Linux sends the signal when the parent *thread* exits:
    agents are spawned from the event loop's thread, which lives as long as the
    node. Without setpriv the agent still runs, but outlives a killed node.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) not found: the serf agent will outlive this node if it is killed")
        return list(argv)
    return [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _EXEC_IF_PARENT, "sh", str(os.getpid()), *argv]


def _agent_env() -> dict[str, str]:
    """The agent's environment: :func:`child_env`, with ``GOMAXPROCS`` 1 unless the node's environment sets it.

    Serf waits on the network: one Go scheduler thread costs about a quarter less idle CPU than one per core
    (measured in docs/scale.md), which counts when many agents share a machine.
    """
    env = child_env(keep=("GOMAXPROCS",))
    env.setdefault("GOMAXPROCS", "1")
    return env


class SerfAgent:
    """One supervised Serf agent; ``rpc`` is its control connection once started.

    ``state_dir`` holds ``serf.json`` (0600) and the snapshot. ``restart``
    turns crash restarts on or off; backoff doubles from ``backoff_s`` up to
    ``max_backoff_s`` and resets once an agent stayed up ``stable_s``.
    """

    def __init__(self, config: AgentConfig, state_dir: Path, *, binary: str = "serf",
                 ready_timeout_s: float = 15.0, restart: bool = True, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, stable_s: float = 30.0) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.binary = binary
        self.ready_timeout_s = ready_timeout_s
        self.restart_enabled = restart
        self._backoff = (backoff_s, max_backoff_s, stable_s)
        self._tags = dict(config.tags)
        self._rpc_auth = config.rpc_auth or secrets.token_hex(24)
        self.rpc_port = config.rpc_port or 0
        self.rpc = SerfRPC("127.0.0.1", 0, self._rpc_auth)
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._join_task: asyncio.Task[None] | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._logs: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = asyncio.Event()
        self._intended_exit = False
        self.state: AgentState = "stopped"
        self.restarts = 0
        self.generation = 0  # bumped on every (re)start that reached ready

    # ------------------------------------------------------------ info

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None and self._ready.is_set()

    @property
    def config_path(self) -> Path:
        return self.state_dir / "serf.json"

    @property
    def tags(self) -> Mapping[str, str]:
        return dict(self._tags)

    def log_tail(self, lines: int = 50) -> list[str]:
        """The agent's last output lines (for ``troubleshoot`` and errors)."""
        return list(self._logs)[-lines:]

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the agent answers RPC; :class:`SerfAgentError` after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError as exc:
            raise SerfAgentError(f"serf agent not ready after {timeout_s:g}s (state {self.state})") from exc

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the agent, wait for its RPC, then join the configured seeds in the background."""
        if self._supervisor is not None and not self._supervisor.done():
            return
        self._intended_exit = False
        self.state = "starting"
        try:
            await self._spawn()
        except BaseException:
            self.state = "failed"
            await self._kill()
            raise
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"serf-supervisor-{self.config.node_name}")

    async def _spawn(self) -> None:
        if not self.config.rpc_port:
            self.rpc_port = _free_loopback_port()
        await self._write_config()
        binary = shutil.which(self.binary)
        if binary is None:
            raise SerfAgentError(f"cannot run {self.binary!r}: no such executable")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *_die_with_parent_argv([binary, "agent", f"-config-file={self.config_path}"]),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=_agent_env())
        except OSError as exc:
            raise SerfAgentError(f"cannot run {self.binary!r}: {exc.strerror or exc}") from exc
        self._log_task = asyncio.create_task(self._drain_logs(self._proc))
        await self._wait_rpc(self._proc)
        self.generation += 1
        self.state = "running"
        self._ready.set()
        if self.config.join:
            self._join_task = asyncio.create_task(self._join_seeds(), name="serf-join")

    async def _write_config(self) -> None:
        snapshot = self.state_dir / "serf.snapshot"
        conf = self.config.serf_json(self.rpc_port, self._rpc_auth, self._tags, snapshot)
        await asyncio.to_thread(_write_private_json, self.config_path, conf)

    async def _wait_rpc(self, proc: asyncio.subprocess.Process) -> None:
        self.rpc.port = self.rpc_port
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if proc.returncode is not None:
                await asyncio.sleep(0.05)  # let the log drain catch the reason
                tail = " | ".join(self.log_tail(5))
                raise SerfAgentError(f"serf agent exited with status {proc.returncode}: {tail}")
            try:
                await self.rpc.reconnect()
                return
            except SerfConnectionError:
                if time.monotonic() > deadline:
                    raise SerfAgentError(
                        f"serf agent RPC did not answer within {self.ready_timeout_s:g}s") from None
                await asyncio.sleep(0.1)

    async def _drain_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self._logs.append(text)
            log.debug("serf[%s]: %s", self.config.node_name, text)

    async def _join_seeds(self) -> None:
        while True:
            try:
                if await self.rpc.join(self.config.join) > 0:
                    return
            except (SerfRPCError, SerfConnectionError) as exc:
                log.info("serf join via %s failed: %s; retrying", ",".join(self.config.join), exc)
            await asyncio.sleep(self.config.join_retry_s)

    async def _supervise(self) -> None:
        backoff, max_backoff, stable = self._backoff
        delay = backoff
        while True:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            await proc.wait()
            if self._log_task is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._log_task), 1.0)
            self._ready.clear()
            self._cancel_join()
            if self._intended_exit:
                return
            log.warning("serf agent %s exited with status %s", self.config.node_name, proc.returncode)
            if not self.restart_enabled:
                self.state = "failed"
                return
            self.state = "restarting"
            delay = backoff if time.monotonic() - started > stable else delay
            while not self._intended_exit:
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff)
                try:
                    await self._spawn()
                    self.restarts += 1
                    break
                except SerfAgentError as exc:
                    log.warning("serf agent restart failed: %s", exc)
                    await self._kill()
            if self._intended_exit:
                return

    def _cancel_join(self) -> None:
        if self._join_task is not None:
            self._join_task.cancel()
            self._join_task = None

    async def join(self, addrs: Sequence[str]) -> int:
        """Join through ``addrs`` now; returns how many answered."""
        return await self.rpc.join(addrs)

    async def set_tags(self, set: Mapping[str, str] | None = None, delete: Sequence[str] = ()) -> None:  # noqa: A002
        """Change tags (checked against the 512-byte limit first); kept across restarts."""
        tags = {k: v for k, v in self._tags.items() if k not in delete}
        tags.update(set or {})
        encode_tags(tags)
        await self.rpc.tags(set or {}, delete)
        self._tags = tags
        await self._write_config()

    async def leave(self, timeout_s: float = 20.0) -> None:
        """Leave the cluster gracefully and stop the agent (no restart follows)."""
        await self._shutdown(graceful=True, timeout_s=timeout_s)

    async def stop(self, graceful: bool = True, timeout_s: float = 20.0) -> None:
        """Stop the agent: leave first when ``graceful``, else terminate (peers see it fail)."""
        await self._shutdown(graceful=graceful, timeout_s=timeout_s)

    async def _shutdown(self, graceful: bool, timeout_s: float) -> None:
        self._intended_exit = True
        self._cancel_join()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self.state = "leaving"
            if graceful and self._ready.is_set():
                try:
                    await asyncio.wait_for(self.rpc.leave(), timeout_s)
                except (SerfRPCError, SerfConnectionError, TimeoutError) as exc:
                    # The agent closes the connection as it shuts down; that is success.
                    log.debug("serf leave: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout_s)
            await self._kill()
        await self.rpc.close()
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._supervisor, 5.0)
            self._supervisor = None
        self.state = "left" if graceful else "stopped"

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), 5.0)
