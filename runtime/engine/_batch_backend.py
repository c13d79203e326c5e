"""The continuous-batching llama.cpp backend, as it runs inside a runner process.

One model, one ``llama_context`` with ``n_seq_max = n_parallel`` sequences,
each with its own part of the KV cache (``n_ctx`` cells per sequence; the
context holds ``n_ctx × n_parallel``). One thread runs the decode loop; every
step it decodes the next token of every generating request in one
``llama_decode`` call, then prompt chunks of requests still being read, and
samples each request that produced logits with that request's own sampler
chain (:mod:`._sequence`). Requests join and leave between steps.

*Chunked prefill*: while other requests are generating, a prompt enters at
most ``prefill_chunk`` tokens per step, so a long prompt delays the running
streams by one chunk's worth of compute per token, never by the whole prompt.
A request alone decodes its prompt in ``n_batch`` pieces, as
``Llama.create_completion`` does, so its output is llama-cpp-python's.

*Prefix reuse*: a finished request leaves its cells in its sequence. A new
request goes, among the free sequences that keep the busy ones packed together
(:func:`choose_slot`), to the one whose cached tokens share the longest prefix
with its prompt and decodes only the rest (a chat that continues re-reads
nothing it has read before).

*One shared cache* (``kv_unified``, opt-in): the context's ``n_ctx × n_parallel``
cells are shared by up to ``n_seq_max`` sequences (default ``4 × n_parallel``),
and requests are admitted by room rather than by a fixed count: a request
enters when a sequence is free and the free cells (after dropping idle
sequences' cached prefixes, least recently used first) cover its prompt, the
prompts still being read and one step of every running request. Short chats
then share the memory that ``n_parallel`` full contexts would reserve. When a
step finds the cache full, the request admitted last steps aside: its cells are
freed, it waits at the head of the queue, and on its return it reads its prompt
and what it has generated again, then goes on (nothing is sent twice, and its
counts stay its own). The request admitted first is never set aside, so it
always finishes. The price: a sequence's cells may lie out of position order,
so a request is no longer bit-identical to bare llama-cpp-python (a lone Gemma
3 270M request after others diverged in 1 of 8 prompts), hence opt-in.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from omx.runtime.engine._gpu import plan_offload
from omx.runtime.engine._sequence import (
    Generation,
    build_sampler,
    penalize_repeats,
    plain_greedy,
    prompt_tokens,
    repeat_window,
)
from omx.runtime.engine._slots import (
    Slot,
    cells_to_free,
    cells_used,
    choose_slot,
    common_prefix,
    preemption_victim,
)
from omx.runtime.engine._wire import ERR_CANCELLED, ERR_ENGINE, ERR_INVALID, ERR_UNSUPPORTED, RequestError
from omx.runtime.engine.cpu_quirks import avoid_broken_amx

__all__ = ["BatchBackend", "Finish"]

Finish = Callable[[str, Any], None]
"""``finish("done", body)`` or ``finish(error_kind, message)``: how a request ends."""

DEFAULT_PREFILL_CHUNK = 128
MAX_SEQUENCES = 256
"""llama.cpp's ``LLAMA_MAX_SEQ``."""


class BatchBackend:
    """Serves ``config['n_parallel']`` concurrent generations from one context by continuous batching."""

    batching = True

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        avoid_broken_amx()
        adapters = config.get("adapters") or []
        if len(adapters) > 1:
            raise RequestError(ERR_UNSUPPORTED, "llama-cpp-python applies at most one LoRA adapter")
        verbose = bool(config.get("verbose", False))
        self.n_parallel = max(1, int(config.get("n_parallel", 1)))
        self.kv_unified = bool(config.get("kv_unified", False))
        n_seq = int(config.get("n_seq_max") or 4 * self.n_parallel) if self.kv_unified else self.n_parallel
        self.n_seq = max(self.n_parallel, min(n_seq, MAX_SEQUENCES))
        n_ctx = int(config["n_ctx"])
        # Through the submodule: avoid_broken_amx patches the defaults there.
        mparams = llama_cpp.llama_cpp.llama_model_default_params()
        # As llama_cpp.Llama sets them, so a request alone computes what Llama computes.
        self.n_batch = max(min(n_ctx, int(config["n_batch"])), self.n_seq)
        self.gpu = plan_offload(Path(config["model_path"]), int(config.get("n_gpu_layers", 0)),
                                n_ctx_total=n_ctx * self.n_parallel, n_ubatch=min(self.n_batch, 512))
        mparams.n_gpu_layers = self.gpu.layers
        mparams.use_mmap = bool(config.get("use_mmap", True))
        self.model = internals.LlamaModel(path_model=str(config["model_path"]), params=mparams, verbose=verbose)
        cpus = multiprocessing.cpu_count()
        self.n_threads = int(config.get("n_threads") or max(cpus // 2, 1))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * self.n_parallel
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(self.n_batch, 512)
        cparams.n_seq_max = self.n_seq
        # By default a cache per sequence: a request's cells lie in position order, as in a lone context,
        # so it computes what bare llama-cpp-python computes whatever ran before it. In one shared cache a
        # sequence's new cells may fill gaps that others left, out of position order: there a lone
        # Gemma 3 270M request after others diverged from bare in 1 of 8 prompts.
        cparams.kv_unified = self.kv_unified
        cparams.n_threads = self.n_threads
        # Steps that carry several sequences run on the batch team: a configured thread count bounds it too.
        cparams.n_threads_batch = int(config.get("n_threads") or cpus)
        cparams.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.embeddings = False
        self._context = internals.LlamaContext(model=self.model, params=cparams, verbose=verbose)
        self.ctx = self._context.ctx
        self._adapter = None
        if adapters:
            self._adapter = llama_cpp.llama_adapter_lora_init(self.model.model, str(adapters[0]).encode("utf-8"))
            if self._adapter is None:
                raise RequestError(ERR_INVALID, f"failed to load LoRA adapter {adapters[0]}")
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            if llama_cpp.llama_set_adapters_lora(self.ctx, arr, 1, (ctypes.c_float * 1)(1.0)):
                raise RequestError(ERR_INVALID, f"failed to apply LoRA adapter {adapters[0]}")
        # A request's context is n_ctx whether its cells are its own or drawn from the shared cache.
        self.n_ctx_seq = n_ctx if self.kv_unified else int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.cells = int(llama_cpp.llama_n_ctx(self.ctx))
        """Cells of the whole cache (all sequences)."""
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.prefill_chunk = max(1, int(config.get("prefill_chunk") or DEFAULT_PREFILL_CHUNK))
        self.metadata = self.model.metadata()
        self.n_vocab = self.model.n_vocab()
        self._slots = [Slot(seq) for seq in range(self.n_seq)]
        self._uses = 0
        self._lock = threading.Condition()
        self._incoming: collections.deque[tuple[int, dict[str, Any], Callable[[str], None], Finish]] = (
            collections.deque())
        self._waiting: collections.deque[Generation] = collections.deque()
        """Requests read and ready, waiting for a sequence (and, in a shared cache, room); decode thread only."""
        self._cancelled: set[int] = set()
        self._finishers: dict[int, tuple[Finish, bool]] = {}
        self._embedder: llama_cpp.Llama | None = None
        self._embed_lock = threading.Lock()
        self.steps = 0
        """Decode calls made so far."""
        self.preemptions = 0
        """Times a running request stepped aside for lack of room in the shared cache."""
        self.peak_running = 0
        """Most requests that held a sequence at once."""
        threading.Thread(target=self._run, daemon=True, name="omx-decode").start()

    def info(self) -> dict[str, Any]:
        return {
            "backend": "llama-cpp",
            "batching": True,
            "n_ctx": self.n_ctx_seq,
            "n_ctx_train": self.model.n_ctx_train(),
            "n_vocab": self.model.n_vocab(),
            "n_embd": self.model.n_embd(),
            "n_parallel": self.n_parallel,
            "sequences": self.n_seq,
            "kv_unified": self.kv_unified,
            "kv_cells": self.cells,
            "n_threads": self.n_threads,
            "n_gpu_layers": self.gpu.layers,
            "size_vram": self.gpu.vram,
            "chat_template": self.metadata.get("tokenizer.chat_template"),
        }

    # ------------------------------------------------------------ requests (any thread)

    def submit(self, rid: int, req: dict[str, Any], emit: Callable[[str], None], finish: Finish) -> None:
        """Queue generation ``rid``; it ends with exactly one call of ``finish``."""
        with self._lock:
            self._incoming.append((rid, req, emit, finish))
            self._lock.notify()

    def cancel(self, rid: int) -> None:
        """Stop generation ``rid`` before the next step (its ``finish`` gets ``cancelled``)."""
        with self._lock:
            self._cancelled.add(rid)
            self._lock.notify()

    def stats(self) -> dict[str, int]:
        """Counters of the decode loop (read without its lock: each is one int)."""
        return {"steps": self.steps, "admitted": self._uses, "preemptions": self.preemptions,
                "peak_running": self.peak_running, "kv_cells_used": cells_used(self._slots)}

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return list(self.model.tokenize(text.encode("utf-8"), add_special, True))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return bytes(self.model.detokenize(list(tokens))).decode("utf-8", errors="replace")

    def embed(self, inputs: Sequence[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self._make_embedder()
            try:
                vectors, count = self._embedder.embed(list(inputs), normalize=normalize, truncate=truncate,
                                                      return_count=True)
            except ValueError as exc:  # input longer than the context without truncate
                raise RequestError(ERR_INVALID, str(exc)) from exc
        return [list(map(float, v)) for v in vectors], int(count)

    def _make_embedder(self) -> llama_cpp.Llama:
        config = self._config
        n_ctx = int(config["n_ctx"])
        arch = self.metadata.get("general.architecture", "")
        declared = self.metadata.get(f"{arch}.pooling_type")
        kwargs: dict[str, Any] = {
            "model_path": str(config["model_path"]), "n_ctx": n_ctx, "n_batch": n_ctx, "n_ubatch": n_ctx,
            "n_gpu_layers": self.gpu.layers, "use_mmap": bool(config.get("use_mmap", True)),
            "verbose": bool(config.get("verbose", False)), "embedding": True,
            "pooling_type": int(declared) if declared is not None else llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        }
        if config.get("n_threads"):
            kwargs["n_threads"] = config["n_threads"]
        if config.get("adapters"):
            kwargs["lora_path"] = str(config["adapters"][0])
        return llama_cpp.Llama(**kwargs)

    # ------------------------------------------------------------ the decode loop (its own thread)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._incoming or self._cancelled or self._busy()
                           or (self._waiting and self._free_slot_exists())):
                    self._lock.wait()
                incoming = list(self._incoming)
                self._incoming.clear()
                cancelled, self._cancelled = self._cancelled, set()
            try:
                for item in incoming:
                    self._prepare(*item)
                self._apply_cancels(cancelled)
                while self._waiting and self._place(self._waiting[0]):
                    self._waiting.popleft()
                if self._busy():
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the runner
                traceback.print_exc()
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _busy(self) -> bool:
        return any(slot.gen is not None for slot in self._slots)

    def _free_slot_exists(self) -> bool:
        return any(slot.gen is None for slot in self._slots)

    def _apply_cancels(self, cancelled: set[int]) -> None:
        if not cancelled:
            return
        for gen in [g for g in self._waiting if g.rid in cancelled]:
            self._waiting.remove(gen)
            finish, _ = self._finishers.pop(gen.rid)
            try:
                finish(ERR_CANCELLED, "generation cancelled")
            finally:
                gen.close()
        for slot in self._slots:
            if slot.gen is not None and slot.gen.rid in cancelled:
                self._end(slot, ERR_CANCELLED, "generation cancelled")

    def _prepare(self, rid: int, req: dict[str, Any], emit: Callable[[str], None], finish: Finish) -> None:
        """Read request ``rid`` (tokens, limits, sampler) and queue it, or end it with its error."""
        try:
            tokens, strip_space = prompt_tokens(self.model, req)
            if len(tokens) >= self.n_ctx_seq:
                raise RequestError(ERR_INVALID, f"Requested tokens ({len(tokens)}) exceed context window of "
                                                f"{self.n_ctx_seq}")
            opts: dict[str, Any] = req["options"]
            num_predict = int(opts.get("num_predict", -1))
            room = self.n_ctx_seq - len(tokens)
            max_tokens = room if num_predict <= 0 or num_predict + len(tokens) >= self.n_ctx_seq else num_predict
            if strip_space:  # the BOS that opens an empty prompt's output counts toward max_tokens
                max_tokens = max(1, max_tokens - 1)
            sampler = build_sampler(self.model, opts, self.n_ctx_seq)
        except RequestError as exc:
            finish(exc.kind, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure: this request fails, not the others
            traceback.print_exc()
            finish(ERR_ENGINE, f"{type(exc).__name__}: {exc}")
            return
        gen = Generation(rid, self.model, tokens, sampler, seq=-1, max_tokens=max_tokens,
                         stop=opts.get("stop") or (), strip_space=strip_space, emit=emit)
        gen.repeat = repeat_window(opts, self.n_ctx_seq)
        gen.greedy = plain_greedy(opts, self.n_ctx_seq)
        self._finishers[rid] = (finish, bool(req.get("return_context")))
        self._waiting.append(gen)

    def _place(self, gen: Generation) -> bool:
        """Give ``gen`` a free sequence (and, in a shared cache, the room it needs); False when it must wait."""
        free = [slot for slot in self._slots if slot.gen is None]
        if not free:
            return False
        tokens = gen.pending
        slot = choose_slot(free, [s.seq for s in self._slots if s.gen is not None], tokens)
        reuse = min(common_prefix(slot.cached, tokens), len(tokens) - 1)
        if self.kv_unified:
            # Room for this prompt, the prompts still being read, and the next token of every request.
            running = [s.gen for s in self._slots if s.gen is not None]
            need = len(tokens) - reuse + sum(len(g.pending) for g in running) + len(running) + 1
            drops = cells_to_free(self._slots, self.cells, need - (len(slot.cached) - reuse), keep=slot)
            if drops is None:
                return False
            for idle in drops:
                self._forget(idle)
        if reuse < len(slot.cached) and not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            reuse = 0
        slot.cached = tokens[:reuse]
        if not gen.preempted:
            gen.reused = reuse
        gen.seq = slot.seq
        gen.pos = reuse
        gen.pending = tokens[reuse:]
        self._uses += 1
        slot.used = self._uses
        slot.gen = gen
        self.peak_running = max(self.peak_running, sum(1 for s in self._slots if s.gen is not None))
        return True

    def _forget(self, slot: Slot) -> None:
        """Drop an idle sequence's cached prefix."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        slot.cached = []

    def _room(self, need: int) -> bool:
        """Whether ``need`` cells of the shared cache are free, after dropping idle prefixes if that is enough."""
        drops = cells_to_free(self._slots, self.cells, need)
        for idle in drops or ():
            self._forget(idle)
        return drops is not None

    def _preempt(self) -> None:
        """Set the request admitted last aside: free its cells; it returns first, reading all its tokens again."""
        slot = preemption_victim(self._slots)
        if slot is None:
            raise RuntimeError("the shared KV cache cannot hold a single request")
        gen = slot.gen
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        slot.cached = []
        slot.gen = None
        gen.pending = gen.tokens + gen.completion
        gen.pos = 0
        gen.preempted += 1
        self.preemptions += 1
        self._waiting.appendleft(gen)

    def _step(self) -> None:
        """One step: the next token of every generating request, then prompt chunks of new ones.

        The generating requests go in one ``llama_decode`` (one token per sequence, in sequence order:
        llama.cpp computes them as one micro-batch); each prompt chunk goes in a call of its own. With
        a cache per sequence, llama.cpp splits a call that mixes sequences of unequal token counts into
        micro-batches of equal counts and consecutive sequence ids: a call carrying 8 new prompts beside
        each other took 3.3 s instead of 0.24 s on Gemma 3 270M. A prompt read alone is also read
        exactly as a lone ``Llama`` reads it. In a shared cache, a step that finds no room sets the
        request admitted last aside (:meth:`_preempt`) until the rest fits.
        """
        generating = [slot for slot in self._slots if slot.gen is not None and not slot.gen.pending]
        while self.kv_unified and generating and not self._room(len(generating)):
            self._preempt()
            generating = [slot for slot in self._slots if slot.gen is not None and not slot.gen.pending]
        if generating:
            for n, slot in enumerate(generating):
                gen = slot.gen
                assert gen is not None
                self._put(n, gen.completion[-1], gen.pos, slot.seq, True)
                slot.cached.append(gen.completion[-1])
                gen.pos += 1
            self._decode(len(generating))
            self._sample([(n, slot) for n, slot in enumerate(generating)])
        read = self._prefill(min(self.n_batch, self.prefill_chunk) if generating else self.n_batch)
        if self.kv_unified and not generating and not read:
            self._preempt()  # every running request is reading its prompt and none fits: the last one waits

    def _prefill(self, budget: int) -> int:
        """Decode prompt chunks of requests still reading theirs, oldest first; returns the tokens read."""
        read = 0
        for slot in sorted((s for s in self._slots if s.gen is not None), key=lambda s: s.used):
            gen = slot.gen
            if gen is None or not gen.pending or budget <= 0:
                continue
            take = min(len(gen.pending), budget)
            if self.kv_unified:
                take = min(take, self.cells - cells_used(s for s in self._slots if s.gen is not None))
                if take <= 0 or not self._room(take):
                    continue
            chunk, gen.pending = gen.pending[:take], gen.pending[take:]
            for k, token in enumerate(chunk):
                self._put(k, token, gen.pos + k, slot.seq, k == take - 1)
            gen.pos += take
            slot.cached.extend(chunk)
            budget -= take
            read += take
            self._decode(take)
            if not gen.pending:
                self._sample([(take - 1, slot)])
        return read

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        code = llama_cpp.llama_decode(self.ctx, self._batch)
        self.steps += 1
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _sample(self, samplers: list[tuple[int, Slot]]) -> None:
        for index, slot in samplers:
            gen = slot.gen
            assert gen is not None
            token = self._pick(gen, index)
            if not gen.accept(token):
                self._end(slot, "done", None)

    def _pick(self, gen: Generation, index: int) -> int:
        """The token ``gen``'s sampler chain chooses from output ``index`` of the last decode call."""
        if gen.repeat is None and not gen.greedy:
            return int(llama_cpp.llama_sampler_sample(gen.sampler, self.ctx, index))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        if gen.repeat is not None and gen.completion:
            last_n, penalty = gen.repeat
            penalize_repeats(logits, gen.completion[-last_n:], penalty)
        if gen.greedy:
            token = int(np.argmax(logits))
            if not np.isnan(logits[token]):
                llama_cpp.llama_sampler_accept(gen.sampler, token)
                return token
        return int(llama_cpp.llama_sampler_sample(gen.sampler, self.ctx, index))

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _end(self, slot: Slot, kind: str, message: str | None) -> None:
        gen = slot.gen
        assert gen is not None
        slot.gen = None
        finish, return_context = self._finishers.pop(gen.rid)
        try:
            if kind == "done":
                finish("done", gen.done(return_context=return_context))
            else:
                finish(kind, message)
        finally:
            gen.close()

    def _fail_all(self, message: str) -> None:
        for slot in self._slots:
            if slot.gen is not None:
                self._end(slot, ERR_ENGINE, message)
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            slot.cached = []
