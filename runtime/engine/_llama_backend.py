"""The llama-cpp-python backend, as it runs inside a runner process.

Generation goes through ``Llama.create_completion`` itself, so the text, stop
handling, sampling chain and token accounting are exactly llama-cpp-python's.
Streaming and cancellation hook into the one method ``create_completion``
drives token by token, :meth:`Llama.generate`: a subclass observes each
sampled token there, streams the part of the text that can no longer change,
and raises to stop a cancelled request at the next token.

Each parallel slot is its own ``Llama`` (its own context and KV cache) over the
same memory-mapped weights, used by one thread at a time. Embeddings use one
more context, created on first use with ``embedding=True``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar

from omx.runtime.engine._gpu import plan_offload
from omx.runtime.engine._textstream import TextStream
from omx.runtime.engine._wire import ERR_CANCELLED, ERR_INVALID, ERR_UNSUPPORTED, RequestError
from omx.runtime.engine.cpu_quirks import avoid_broken_amx

__all__ = ["LlamaBackend"]


class _Cancelled(Exception):
    pass


class _Tap:
    """Per-request observer of the tokens ``generate`` yields."""

    __slots__ = ("cancel", "completion", "emit", "first_at", "llm", "prompt", "sent", "stream", "strip_space")

    def __init__(self, llm: _TappedLlama, emit: Callable[[str], None], cancel: threading.Event,
                 stop: Sequence[str], strip_space: bool) -> None:
        self.llm = llm
        self.emit = emit
        self.cancel = cancel
        self.stream = TextStream(stop)
        self.prompt: list[int] = []
        self.completion: list[int] = []
        self.sent: list[str] = []
        self.first_at = 0
        self.strip_space = strip_space

    def on_token(self, token: int) -> None:
        if not self.first_at:
            self.first_at = time.perf_counter_ns()
        if self.cancel.is_set():
            raise _Cancelled
        if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
            return
        self.completion.append(token)
        piece = self.llm._model.detokenize([token])
        if self.strip_space:
            # create_completion detokenizes [BOS, ...] for an empty prompt, which drops one leading space.
            if not piece:
                return
            self.strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        text, _ = self.stream.feed(piece)
        if text:
            self.sent.append(text)
            self.emit(text)


class _TappedLlama(llama_cpp.Llama):
    tap: _Tap | None = None

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:  # type: ignore[override]
        tap = self.tap
        if tap is None:
            yield from super().generate(tokens, *args, **kwargs)
            return
        tap.prompt = list(tokens)
        for token in super().generate(tokens, *args, **kwargs):
            tap.on_token(token)
            yield token


def _pooling(llm: llama_cpp.Llama) -> int:
    declared = llm.metadata.get(f"{llm.metadata.get('general.architecture', '')}.pooling_type")
    return int(declared) if declared is not None else llama_cpp.LLAMA_POOLING_TYPE_MEAN


class LlamaBackend:
    """Loads ``config['n_parallel']`` slots of one GGUF model and serves requests on them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        avoid_broken_amx()
        adapters = config.get("adapters") or []
        if len(adapters) > 1:
            raise RequestError(ERR_UNSUPPORTED, "llama-cpp-python applies at most one LoRA adapter")
        parallel = max(1, int(config.get("n_parallel", 1)))
        self.gpu = plan_offload(Path(config["model_path"]), int(config.get("n_gpu_layers", 0)),
                                n_ctx_total=int(config["n_ctx"]) * parallel,
                                n_ubatch=min(int(config["n_batch"]), 512))
        self._kwargs: dict[str, Any] = {
            "model_path": config["model_path"],
            "n_ctx": config["n_ctx"],
            "n_batch": config["n_batch"],
            "n_gpu_layers": self.gpu.layers,
            "use_mmap": config.get("use_mmap", True),
            "verbose": bool(config.get("verbose", False)),
        }
        if config.get("n_threads"):
            self._kwargs["n_threads"] = config["n_threads"]
        if adapters:
            self._kwargs["lora_path"] = adapters[0]
        self.slots: list[_TappedLlama] = [
            _TappedLlama(**self._kwargs) for _ in range(max(1, int(config.get("n_parallel", 1))))
        ]
        self._embedder: llama_cpp.Llama | None = None
        self._embed_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        llm = self.slots[0]
        return {
            "backend": "llama-cpp",
            "n_ctx": llm.n_ctx(),
            "n_ctx_train": llm._model.n_ctx_train(),
            "n_vocab": llm.n_vocab(),
            "n_embd": llm.n_embd(),
            "n_parallel": len(self.slots),
            "n_gpu_layers": self.gpu.layers,
            "size_vram": self.gpu.vram,
            "n_threads": llm.n_threads,
            "chat_template": llm.metadata.get("tokenizer.chat_template"),
        }

    # ------------------------------------------------------------ generation

    def complete(self, slot: int, req: dict[str, Any], emit: Callable[[str], None],
                 cancel: threading.Event) -> dict[str, Any]:
        """Run one generation on ``slot``; stream through ``emit``; return the ``done`` frame body."""
        llm = self.slots[slot]
        opts: dict[str, Any] = req["options"]
        prompt: str = req["prompt"]
        context: list[int] = list(req.get("context") or ())
        add_bos = bool(req.get("add_bos", True))
        if context or not add_bos:
            # A token list bypasses create_completion's own BOS handling; context already starts with one.
            tokens = context + (llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else [])
            if not tokens:
                raise RequestError(ERR_INVALID, "nothing to generate from: empty prompt without BOS")
            prompt_arg: str | list[int] = tokens
        else:
            prompt_arg = prompt
        grammar = None
        if opts.get("grammar"):
            grammar = self._grammar(llm, opts["grammar"])
        repeat_last_n = int(opts.get("repeat_last_n", 64))
        llm.last_n_tokens_size = llm.n_ctx() if repeat_last_n < 0 else repeat_last_n
        num_predict = int(opts.get("num_predict", -1))
        seed = opts.get("seed")
        tap = _Tap(llm, emit, cancel, opts.get("stop") or (), strip_space=prompt_arg == "")
        llm.tap = tap
        started = time.perf_counter_ns()
        try:
            result: Any = llm.create_completion(
                prompt_arg,
                max_tokens=num_predict if num_predict > 0 else None,
                temperature=float(opts.get("temperature", 0.8)),
                top_k=int(opts.get("top_k", 40)),
                top_p=float(opts.get("top_p", 0.9)),
                min_p=float(opts.get("min_p", 0.0)),
                typical_p=float(opts.get("typical_p", 1.0)),
                repeat_penalty=float(opts.get("repeat_penalty", 1.1)),
                presence_penalty=float(opts.get("presence_penalty", 0.0)),
                frequency_penalty=float(opts.get("frequency_penalty", 0.0)),
                stop=list(opts.get("stop") or ()),
                seed=int(seed) if seed is not None else random.getrandbits(31),
                grammar=grammar,
                stream=False,
            )
        except _Cancelled:
            raise RequestError(ERR_CANCELLED, "generation cancelled") from None
        except ValueError as exc:  # prompt longer than the context window
            raise RequestError(ERR_INVALID, str(exc)) from exc
        finally:
            llm.tap = None
        ended = time.perf_counter_ns()
        choice = result["choices"][0]
        first = tap.first_at or ended
        self._finish_stream(tap, choice["text"])
        done: dict[str, Any] = {
            "done_reason": "stop" if choice["finish_reason"] == "stop" else "length",
            "prompt_eval_count": len(tap.prompt),
            "prompt_eval_duration": first - started,
            # Counted here rather than from usage, which counts the BOS of an empty prompt as output.
            "eval_count": len(tap.completion),
            "eval_duration": ended - first,
        }
        if req.get("return_context"):
            done["context"] = tap.prompt + tap.completion
        return done

    @staticmethod
    def _grammar(llm: llama_cpp.Llama, text: str) -> LlamaGrammar:
        """Parse ``text`` once here: llama-cpp-python hands an unparsable grammar on as a null sampler."""
        grammar = LlamaGrammar.from_string(text, verbose=False)
        sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode("utf-8"),
                                                       grammar._root.encode("utf-8"))
        if not sampler:
            raise RequestError(ERR_INVALID, "invalid grammar: llama.cpp could not parse it")
        llama_cpp.llama_sampler_free(sampler)
        return grammar

    @staticmethod
    def _finish_stream(tap: _Tap, final: str) -> None:
        """Send what is left of the final text; the streamed part is always a prefix of it."""
        sent = "".join(tap.sent)
        if final.startswith(sent) and len(final) > len(sent):
            tap.emit(final[len(sent):])

    # ------------------------------------------------------------ one-shot requests

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return list(self.slots[0].tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.slots[0].detokenize(list(tokens)).decode("utf-8", errors="replace")

    def embed(self, inputs: Sequence[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        with self._embed_lock:
            if self._embedder is None:
                n_ctx = int(self._config["n_ctx"])
                self._embedder = llama_cpp.Llama(
                    **{**self._kwargs, "n_batch": n_ctx, "n_ubatch": n_ctx},
                    embedding=True,
                    pooling_type=_pooling(self.slots[0]),
                )
            try:
                vectors, count = self._embedder.embed(list(inputs), normalize=normalize, truncate=truncate,
                                                      return_count=True)
            except ValueError as exc:  # input longer than the context without truncate
                raise RequestError(ERR_INVALID, str(exc)) from exc
        return [list(map(float, v)) for v in vectors], int(count)
