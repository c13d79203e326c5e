"""The ctransformers backend, as it runs inside a runner process.

ctransformers bundles an older llama.cpp; its sampler knows top_k, top_p,
temperature and the repeat penalty over the last n tokens. Other sampling
options are ignored, and grammars are refused. Each parallel slot is its own
``LLM`` (its own context) over the same file.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ctransformers import AutoModelForCausalLM

from omx.runtime.engine._textstream import TextStream
from omx.runtime.engine._wire import ERR_CANCELLED, ERR_INVALID, ERR_UNSUPPORTED, RequestError

__all__ = ["CTransformersBackend"]


class CTransformersBackend:
    """Serves one GGUF (or GGML) model with ctransformers."""

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("adapters"):
            raise RequestError(ERR_UNSUPPORTED, "the ctransformers backend does not apply LoRA adapters")
        self._threads = int(config.get("n_threads") or -1)
        self._batch = int(config["n_batch"])
        self.slots = [
            AutoModelForCausalLM.from_pretrained(
                config["model_path"],
                model_type=config.get("model_type") or "llama",
                context_length=int(config["n_ctx"]),
                batch_size=self._batch,
                threads=self._threads,
                gpu_layers=int(config.get("n_gpu_layers", 0)),
                mmap=bool(config.get("use_mmap", True)),
            )
            for _ in range(max(1, int(config.get("n_parallel", 1))))
        ]
        self._embed_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        llm = self.slots[0]
        return {
            "backend": "ctransformers",
            "n_ctx": llm.context_length,
            "n_vocab": llm.vocab_size,
            "n_parallel": len(self.slots),
            "n_threads": self._threads,
            "chat_template": None,
        }

    def _tokenize(self, llm: Any, text: str, add_bos: bool) -> list[int]:
        # ctransformers' own tokenize() sizes its buffer as characters + 1 and the native side writes
        # past it when byte fallback yields more tokens; every byte (and the "▁" added for each space)
        # yields at most three tokens, so this buffer always suffices.
        data = text.encode("utf-8")
        buf = (ctypes.c_int * (3 * len(data) + 8))()
        count = llm.ctransformers_llm_tokenize(data, add_bos, buf)
        return list(buf[:count])

    def complete(self, slot: int, req: dict[str, Any], emit: Callable[[str], None],
                 cancel: threading.Event) -> dict[str, Any]:
        llm = self.slots[slot]
        opts: dict[str, Any] = req["options"]
        if opts.get("grammar"):
            raise RequestError(ERR_UNSUPPORTED, "the ctransformers backend does not support grammars (format)")
        context = list(req.get("context") or ())
        prompt: str = req["prompt"]
        add_bos = bool(req.get("add_bos", True)) and not context
        tokens = context + (self._tokenize(llm, prompt, add_bos) if prompt else
                            ([llm.bos_token_id] if add_bos else []))
        if not tokens:
            raise RequestError(ERR_INVALID, "nothing to generate from: empty prompt without BOS")
        n_ctx = llm.context_length
        if len(tokens) >= n_ctx:
            raise RequestError(ERR_INVALID, f"Requested tokens ({len(tokens)}) exceed context window of {n_ctx}")
        num_predict = int(opts.get("num_predict", -1))
        budget = n_ctx - len(tokens)
        max_tokens = min(num_predict, budget) if num_predict > 0 else budget
        seed = opts.get("seed")
        stream = TextStream(opts.get("stop") or ())
        completion: list[int] = []
        reason = "length"
        started = time.perf_counter_ns()
        first = 0
        for token in llm.generate(
            tokens,
            top_k=int(opts.get("top_k", 40)),
            top_p=float(opts.get("top_p", 0.9)),
            temperature=float(opts.get("temperature", 0.8)),
            repetition_penalty=float(opts.get("repeat_penalty", 1.1)),
            last_n_tokens=int(opts.get("repeat_last_n", 64)),
            seed=int(seed) if seed is not None else -1,
            batch_size=self._batch,
            threads=self._threads,
            reset=True,
        ):
            if not first:
                first = time.perf_counter_ns()
            if cancel.is_set():
                raise RequestError(ERR_CANCELLED, "generation cancelled")
            completion.append(token)
            text, stopped = stream.feed(llm.detokenize([token], decode=False))
            if text:
                emit(text)
            if stopped:
                reason = "stop"
                break
            if len(completion) >= max_tokens:
                break
        else:
            reason = "stop"  # the model produced its end-of-sequence token
        if reason != "stop" or not stream.stopped:
            rest = stream.flush()
            if rest:
                emit(rest)
        ended = time.perf_counter_ns()
        first = first or ended
        done: dict[str, Any] = {
            "done_reason": reason,
            "prompt_eval_count": len(tokens),
            "prompt_eval_duration": first - started,
            "eval_count": len(completion),
            "eval_duration": ended - first,
        }
        if req.get("return_context"):
            done["context"] = tokens + completion
        return done

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self._tokenize(self.slots[0], text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        data: bytes = self.slots[0].detokenize(list(tokens), decode=False)
        return data.decode("utf-8", errors="replace")

    def embed(self, inputs: Sequence[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        vectors: list[list[float]] = []
        count = 0
        with self._embed_lock:
            llm = self.slots[0]
            n_ctx = llm.context_length
            for text in inputs:
                tokens = self._tokenize(llm, text, True)
                if len(tokens) > n_ctx:
                    if not truncate:
                        raise RequestError(ERR_INVALID, "input length exceeds the context length")
                    tokens = tokens[:n_ctx]
                count += len(tokens)
                vector = [float(x) for x in llm.embed(tokens)]
                if normalize:
                    norm = sum(x * x for x in vector) ** 0.5
                    vector = [x / norm for x in vector] if norm else vector
                vectors.append(vector)
        return vectors, count
