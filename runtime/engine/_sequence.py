"""One generation inside the batching runner: its tokens, sampler and text stream.

A :class:`Generation` is what the decode loop (:mod:`._batch_backend`) keeps
per request. It knows nothing of batches: the loop tells it the token it
sampled (:meth:`Generation.accept`), and it decides whether the request goes
on, streaming the text that can no longer change. Its sampler chain is built
exactly as llama-cpp-python's ``Llama._init_sampler`` builds one (penalties,
grammar, then greedy or top-k / typical / top-p / min-p / temperature / dist
with the request's seed), so a request alone in the runner samples what
``Llama.create_completion`` samples.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import LlamaGrammar

from omx.runtime.engine._textstream import TextStream
from omx.runtime.engine._wire import ERR_INVALID, RequestError

__all__ = ["Generation", "build_sampler", "penalize_repeats", "plain_greedy", "prompt_tokens", "repeat_window"]


def prompt_tokens(model: Any, req: dict[str, Any]) -> tuple[list[int], bool]:
    """The prompt's tokens as ``create_completion`` builds them, and whether its output is seeded with BOS.

    An empty prompt is evaluated as ``[BOS]`` and that BOS opens the output, which
    drops one leading space from the text (llama-cpp-python's detokenizer does so).
    """
    prompt: str = req["prompt"]
    context = [int(t) for t in req.get("context") or ()]
    if context or not req.get("add_bos", True):
        # A token list bypasses BOS handling; a context already starts with one.
        tokens = context + (model.tokenize(prompt.encode("utf-8"), False, True) if prompt else [])
        if not tokens:
            raise RequestError(ERR_INVALID, "nothing to generate from: empty prompt without BOS")
        return tokens, False
    bos = model.token_cls() if model.token_cls() != -1 else model.token_bos()
    bos_tokens = [bos] if model.add_bos_token() and bos != -1 else []
    sep = model.token_sep()
    eos_tokens = [sep if sep != -1 else model.token_eos()] if (model.add_eos_token() or sep != -1) else []
    if not prompt:
        return bos_tokens + eos_tokens, True
    return bos_tokens + model.tokenize(prompt.encode("utf-8"), False, True) + eos_tokens, False


def repeat_window(opts: dict[str, Any], n_ctx: int) -> tuple[int, float] | None:
    """``(last_n, penalty)`` when the only penalty is a repeat penalty, which the caller then applies.

    llama.cpp's penalties sampler looks every vocabulary entry up in a hash map
    (about 1.5 ms a token for Gemma 3's 262,144 entries, paid by every sequence
    of a step); multiplying the few logits of the window's tokens in place, with
    the same float32 operations, gives the sampler chain the same numbers.
    """
    last_n = int(opts.get("repeat_last_n", 64))
    last_n = n_ctx if last_n < 0 else last_n
    penalty = float(opts.get("repeat_penalty", 1.1))
    if float(opts.get("frequency_penalty", 0.0)) or float(opts.get("presence_penalty", 0.0)):
        return None
    if last_n == 0 or penalty == 1.0:
        return None
    return last_n, penalty


def plain_greedy(opts: dict[str, Any], n_ctx: int) -> bool:
    """Whether the chain :func:`build_sampler` makes for ``opts`` only picks the highest logit.

    Then the caller may take the first highest logit itself (llama.cpp's greedy
    sampler keeps the first of equal logits, as ``argmax`` does) instead of having
    llama.cpp copy the whole vocabulary into a candidate array first.
    """
    if float(opts.get("temperature", 0.8)) != 0.0 or opts.get("grammar"):
        return False
    if repeat_window(opts, n_ctx) is not None:
        return True
    return (float(opts.get("repeat_penalty", 1.1)) == 1.0 and not float(opts.get("frequency_penalty", 0.0))
            and not float(opts.get("presence_penalty", 0.0)))


def penalize_repeats(logits: Any, window: Sequence[int], penalty: float) -> None:
    """Apply a repeat penalty to the float32 ``logits`` of the tokens in ``window``, as llama.cpp does."""
    ids = np.fromiter(set(window), dtype=np.int64)
    values = logits[ids]
    factor = np.float32(penalty)
    logits[ids] = np.where(values <= 0, values * factor, values / factor)


def build_sampler(model: Any, opts: dict[str, Any], n_ctx: int) -> Any:
    """A llama.cpp sampler chain for ``opts``; the caller frees it with ``llama_sampler_free``.

    Without a penalties sampler when :func:`repeat_window` says the caller applies the repeat penalty.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    try:
        repeat_last_n = int(opts.get("repeat_last_n", 64))
        if repeat_window(opts, n_ctx) is None:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                model.n_vocab(), n_ctx if repeat_last_n < 0 else repeat_last_n,
                float(opts.get("repeat_penalty", 1.1)), float(opts.get("frequency_penalty", 0.0)),
                float(opts.get("presence_penalty", 0.0))))
        if opts.get("grammar"):
            add(chain, _grammar(model, str(opts["grammar"])))
        temp = float(opts.get("temperature", 0.8))
        seed = opts.get("seed")
        seed = int(seed) if seed is not None else random.getrandbits(31)
        if temp < 0.0:
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        elif temp == 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(chain, llama_cpp.llama_sampler_init_top_k(int(opts.get("top_k", 40))))
            add(chain, llama_cpp.llama_sampler_init_typical(float(opts.get("typical_p", 1.0)), 1))
            add(chain, llama_cpp.llama_sampler_init_top_p(float(opts.get("top_p", 0.9)), 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(float(opts.get("min_p", 0.0)), 1))
            add(chain, llama_cpp.llama_sampler_init_temp(temp))
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise
    return chain


def _grammar(model: Any, text: str) -> Any:
    """Parse ``text`` here: llama.cpp answers an unparsable grammar with a null sampler."""
    try:
        grammar = LlamaGrammar.from_string(text, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise RequestError(ERR_INVALID, f"invalid grammar: {exc}") from exc
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar._grammar.encode("utf-8"),
                                                   grammar._root.encode("utf-8"))
    if not sampler:
        raise RequestError(ERR_INVALID, "invalid grammar: llama.cpp could not parse it")
    return sampler


class Generation:
    """The state of one request between its admission and its ``done``.

    ``tokens`` is the prompt; ``pending`` the part of it not yet decoded;
    ``completion`` the tokens generated so far (an end-of-generation token is
    never among them). ``emit`` receives streamed text.
    """

    __slots__ = ("cancelled", "completion", "emit", "finish_reason", "first_at", "greedy", "max_tokens", "model",
                 "pending", "pos", "preempted", "repeat", "reused", "rid", "sampler", "sent", "seq", "started",
                 "stream", "strip_space", "tokens")

    def __init__(self, rid: int, model: Any, tokens: list[int], sampler: Any, *, seq: int, max_tokens: int,
                 stop: Sequence[str], strip_space: bool, emit: Callable[[str], None]) -> None:
        self.rid = rid
        self.model = model
        self.tokens = tokens
        self.sampler = sampler
        self.seq = seq
        self.max_tokens = max_tokens
        self.stream = TextStream(stop)
        self.strip_space = strip_space
        self.emit = emit
        self.completion: list[int] = []
        self.sent: list[str] = []
        self.pending: list[int] = tokens
        self.pos = 0
        """Position of the next token to decode (cells already in this sequence's cache)."""
        self.reused = 0
        """Prompt tokens found in the cache of the sequence's previous request."""
        self.repeat: tuple[int, float] | None = None
        """``(last_n, penalty)`` of a repeat penalty the decode loop applies (see :func:`repeat_window`)."""
        self.greedy = False
        """The decode loop may take the highest logit itself (see :func:`plain_greedy`)."""
        self.started = time.perf_counter_ns()
        self.first_at = 0
        self.finish_reason = ""
        self.cancelled = False
        self.preempted = 0
        """Times it stepped aside for lack of room in a shared cache (see :mod:`._batch_backend`)."""

    def accept(self, token: int) -> bool:
        """Take the token sampled for this request; True while it goes on generating."""
        if not self.first_at:
            self.first_at = time.perf_counter_ns()
        model = self.model
        if llama_cpp.llama_vocab_is_eog(model.vocab, token):
            self.finish_reason = "stop"
            return False
        self.completion.append(token)
        piece = model.detokenize([token])
        if self.strip_space and piece:
            self.strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        if piece:
            text, stopped = self.stream.feed(piece)
            if text:
                self.sent.append(text)
                self.emit(text)
            if stopped:
                self.finish_reason = "stop"
                return False
        if len(self.completion) >= self.max_tokens:
            self.finish_reason = "length"
            return False
        return True

    def done(self, *, return_context: bool) -> dict[str, Any]:
        """The ``done`` frame body; streams what the text stream still holds."""
        ended = time.perf_counter_ns()
        rest = self.stream.flush()
        if rest:
            self.emit(rest)
        first = self.first_at or ended
        body: dict[str, Any] = {
            "done_reason": self.finish_reason or "length",
            "prompt_eval_count": len(self.tokens),
            "prompt_eval_duration": first - self.started,
            "eval_count": len(self.completion),
            "eval_duration": ended - first,
            "prompt_cached": self.reused,
            "preempted": self.preempted,
        }
        if return_context:
            body["context"] = self.tokens + self.completion
        return body

    def close(self) -> None:
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None
