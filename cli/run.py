"""``omx run MODEL [PROMPT]``: one streamed generation, or an interactive chat like ``ollama run``.

With a prompt (or text piped on stdin) the answer of ``/api/generate`` is written
to stdout as it arrives. Without one on a terminal, a REPL sends ``/api/chat``
with the whole history every turn. ``/bye`` or Ctrl+D leaves (exit 0), Ctrl+C
cancels the reply being streamed, ``/clear`` forgets the history.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import click

from omx.cli.client import NodeClient, client_for
from omx.cli.format import go_duration

__all__ = ["ChatSession", "metrics_summary", "run_cmd"]

_HELP = """Available Commands:
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
"""


def metrics_summary(final: dict[str, Any]) -> str:
    """The timings ``ollama run --verbose`` prints, from a final ``done`` object (pure)."""
    lines: list[str] = []

    def add(label: str, value: str) -> None:
        lines.append(f"{label + ':':<22}{value}")

    if final.get("total_duration"):
        add("total duration", go_duration(final["total_duration"]))
    if final.get("load_duration"):
        add("load duration", go_duration(final["load_duration"]))
    for prefix, label in (("prompt_eval", "prompt eval"), ("eval", "eval")):
        count, duration = final.get(f"{prefix}_count"), final.get(f"{prefix}_duration")
        if count:
            add(f"{label} count", f"{count} token(s)")
        if duration:
            add(f"{label} duration", go_duration(duration))
            if count:
                add(f"{label} rate", f"{count / (duration / 1e9):.2f} tokens/s")
    return "\n".join(lines)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@dataclass
class ChatSession:
    """The running history of an interactive chat."""

    model: str
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)

    def request(self, prompt: str) -> dict[str, Any]:
        """The ``/api/chat`` body for the next turn, history included (pure)."""
        history = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {
            "model": self.model,
            "messages": history + self.messages + [{"role": "user", "content": prompt}],
            "stream": True,
        }
        body.update(self.options)
        return body

    def commit(self, prompt: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _stream_reply(client: NodeClient, path: str, body: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
    """Stream one answer to stdout; returns the full text and the final object."""
    parts: list[str] = []
    final: dict[str, Any] = {}
    for item in client.stream("POST", path, body):
        piece = item.get("response", "") if key == "response" else (item.get("message") or {}).get("content", "")
        if piece:
            parts.append(piece)
            _write(piece)
        if item.get("done"):
            final = item
    return "".join(parts), final


def _read_message() -> str | None:
    """One user message (``\"\"\"`` opens a multi-line one); None on Ctrl+D."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""'):
        return first.rstrip()[:-3]
    collected = [first]
    while True:
        try:
            following = input("... ")
        except EOFError:
            return None
        if following.rstrip().endswith('"""'):
            collected.append(following.rstrip()[:-3])
            return "\n".join(collected)
        collected.append(following)


def _interactive(client: NodeClient, session: ChatSession, verbose: bool) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            prompt = _read_message()
        except KeyboardInterrupt:
            _write("\nUse Ctrl + d or /bye to exit.\n")
            continue
        if prompt is None:
            _write("\n")
            return
        command = prompt.strip()
        if not command:
            continue
        if command in ("/bye", "/exit"):
            return
        if command == "/clear":
            session.messages.clear()
            _write("Cleared session context\n")
            continue
        if command in ("/?", "/help"):
            _write(_HELP)
            continue
        if command.startswith("/"):
            _write(f"Unknown command '{command.split()[0]}'. Type /? for help\n")
            continue
        try:
            reply, final = _stream_reply(client, "/api/chat", session.request(prompt), "message")
        except KeyboardInterrupt:
            # The reply is dropped with its question: the history stays consistent.
            _write("\n\n")
            continue
        _write("\n\n")
        session.commit(prompt, reply)
        if verbose and final:
            click.echo(metrics_summary(final) + "\n", err=True)


@click.command("run")
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["json"]), help="Response format.")
@click.option("--system", help="System message.")
@click.option("--keepalive", help="How long to keep the model loaded (e.g. 5m, 1h, -1).")
@click.option("--verbose", is_flag=True, help="Show timings for the response.")
@click.pass_context
def run_cmd(
    ctx: click.Context, model: str, prompt: tuple[str, ...], fmt: str | None, system: str | None,
    keepalive: str | None, verbose: bool,
) -> None:
    """Run a model: answer PROMPT, or chat interactively."""
    stdin = sys.stdin
    parts = list(prompt)
    interactive = stdin.isatty() and not parts
    if not stdin.isatty():
        piped = stdin.read()
        if piped:
            parts.insert(0, piped)
    options: dict[str, Any] = {}
    if fmt:
        options["format"] = fmt
    if keepalive is not None:
        options["keep_alive"] = keepalive
    with client_for(ctx) as client:
        if interactive:
            client.post("/api/show", {"model": model})
            _interactive(client, ChatSession(model, system, options), verbose)
            return
        body: dict[str, Any] = {"model": model, "prompt": " ".join(parts), "stream": True, **options}
        if system is not None:
            body["system"] = system
        text, final = _stream_reply(client, "/api/generate", body, "response")
        if text and not text.endswith("\n"):
            _write("\n")
        if verbose and final:
            click.echo(metrics_summary(final), err=True)
