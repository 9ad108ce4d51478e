"""Token ids in, logits out, on llama.cpp's multi-sequence KV cache (the step contract).

One llama.cpp context serves every sequence: the engine's slot is llama.cpp's
sequence id, and the cache is *unified* (every sequence draws positions from one
pool of cells, as ``llama-server --kv-unified``), sized to the engine's KV
budget rather than slots times context. To the engine the cache is contiguous
(slot ``s`` owns blocks ``s * blocks_per_slot`` on): a block names positions of
one sequence, which is all llama.cpp needs, since it places cells itself.

- A step drops what a sequence holds at and after its ``start`` first
  (``llama_memory_seq_rm``): rejected drafts and a finished sequence's stale
  tail never leak into attention.
- ``copy_blocks`` (a prefix cached in another slot) is ``llama_memory_seq_cp``,
  which in a unified cache adds the sequence to the same cells: nothing is copied.
- ``release_blocks`` removes the positions, giving their cells back to the pool.

The whole step is one ``llama_decode`` (llama.cpp splits it into micro-batches),
so decode rows and prompt chunks share the weights' pass over memory; every
decode in the process runs on one thread (``on_compute_thread``).

Numerics: a sequence's logits in a batch equal its logits alone up to llama.cpp's
rounding, not bit for bit. Its attention sums in an order that depends on where
the sequence's cells lie and on how many tokens the step carries (one token over
512+ cells splits across threads), and its 8-bit activations amplify the
difference; a near-tie may resolve differently, as in ``llama-server``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp as llama
import numpy as np

from llmk.backend import KVLayout, Runner, SequenceStep
from llmk.errors import RuntimeFailure, SourceError, UnsupportedError
from llmk.logs import get_logger
from llmk_backend_llamacpp.backend import (
    KV_ITEM_BYTES,
    KV_TYPES,
    LOAD_OVERHEAD_BYTES,
    UBATCH_TOKENS,
    LlamaCppOptions,
    uses_extra_buffers,
)

log = get_logger("llmk.llamacpp")
T = TypeVar("T")

BLOCK_SIZE = 16
#: Tokens per ``llama_decode`` call; a bigger step is split (prompt chunks rarely exceed it).
BATCH_TOKENS = 2048
#: What a drafted token adds to a batch-1 decode step on the CPU, as a share of it:
#: 0.35-0.50 in ``python bench/draft_cost.py --backend llamacpp`` (SmolLM2 Q4_1, 2 cores;
#: docs/BENCHMARKS.md), against 0.03-0.25 on the other backends.
CPU_DRAFT_TOKEN_COST = 0.45

_init_lock = threading.Lock()
_initialized = False
_compute: ThreadPoolExecutor | None = None


def on_compute_thread(function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` on the process's one llama.cpp compute thread.

    llama.cpp's CPU build parallelizes with OpenMP, and GNU OpenMP keeps a pool of
    worker threads per calling thread; once two pools live in a process it stops
    spinning between parallel regions (more threads than cores), and every step
    waits for its workers to wake. Measured with SmolLM2 on 2 cores: 114 tokens/s from
    the first calling thread, 51 from a second one. So every decode, from every
    runner, goes through one thread."""
    global _compute
    with _init_lock:
        if _compute is None:
            _compute = ThreadPoolExecutor(1, thread_name_prefix="llmk-llamacpp")
    return _compute.submit(function, *args).result()


@contextmanager
def default_model_params_as_llmk() -> Iterator[None]:
    """llama-cpp-python's ``Llama`` constructed inside loads its model as llmk does by default
    (extra buffers off where the CPU has AMX): the peer that benchmarks and tests run on
    the same file must not crash where llmk does not. ``Llama`` has no parameter for it."""
    import llama_cpp.llama as high_level

    module = high_level.llama_cpp
    original = module.llama_model_default_params

    def params() -> Any:
        defaults = original()
        defaults.use_extra_bufts = uses_extra_buffers()
        return defaults

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = original


def init_backend() -> None:
    """Once per process: llama.cpp's log to llmk's (errors only), its backends ready."""
    global _initialized
    with _init_lock:
        if not _initialized:
            llama.llama_log_set(_quiet, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _initialized = True


@llama.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp prints its load log to stderr; keep only its errors (level 4)."""
    if level == 4:
        log.error("llamacpp.error", message=text.decode("utf-8", "replace").rstrip())


class Model:
    """A loaded ``llama_model`` and what the runners read from it."""

    def __init__(self, handle: ctypes.c_void_p, path: Path, device: str, options: LlamaCppOptions):
        self.handle, self.path, self.device, self.options = handle, path, device, options
        self.vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(handle))
        self.n_embd = llama.llama_model_n_embd(handle)
        self.n_layer = llama.llama_model_n_layer(handle)
        self.n_head_kv = llama.llama_model_n_head_kv(handle)
        self.head_dim = self.n_embd // llama.llama_model_n_head(handle)
        self.max_context = llama.llama_model_n_ctx_train(handle)
        self.threads = options.threads or len(os.sched_getaffinity(0))

    def context(self, *, n_ctx: int, n_seq: int, embeddings: bool = False) -> ctypes.c_void_p:
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = BATCH_TOKENS
        # A non-causal encoder sees a whole sequence in one micro-batch.
        params.n_ubatch = BATCH_TOKENS if embeddings else UBATCH_TOKENS
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True
        params.embeddings = embeddings
        params.type_k = params.type_v = KV_TYPES[self.options.kv_type]
        if embeddings:
            params.pooling_type = llama.LLAMA_POOLING_TYPE_NONE  # the core pools
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.options.flash_attention else 0
        params.no_perf = True
        context = llama.llama_init_from_model(self.handle, params)
        if not context:
            raise RuntimeFailure("llamacpp", f"could not create a context of {n_ctx} positions for {self.path.name}")
        return context

    def close(self) -> None:
        if self.handle:
            llama.llama_model_free(self.handle)
            self.handle = None


def load_model(source: str, path: Path, device: str, options: LlamaCppOptions) -> Model:
    init_backend()
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 999 if device.startswith("cuda") else 0
    params.main_gpu = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    params.load_mode = llama.LLAMA_LOAD_MODE_MMAP if options.mmap else llama.LLAMA_LOAD_MODE_NONE
    params.use_extra_bufts = uses_extra_buffers(options.extra_buffers)
    handle = llama.llama_model_load_from_file(str(path).encode(), params)
    if not handle:
        raise SourceError(source, f"llama.cpp cannot load {path} (an architecture it does not know, or a "
                          "corrupt file; its log above says which)")
    return Model(handle, path, device, options)


class _Batch:
    """A ``llama_batch`` over NumPy arrays, filled with slices instead of a Python loop."""

    def __init__(self, capacity: int):
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.output = np.zeros(capacity, np.int8)
        # seq_id is an array of pointers, each to a token's (one) sequence id.
        base = self.seq.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(llama.llama_seq_id) * capacity)(
            *(ctypes.cast(base + 4 * i, ctypes.POINTER(llama.llama_seq_id)) for i in range(capacity)))
        self.struct = llama.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(llama.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ptrs,
            logits=self.output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


class LlamaCppRunner(Runner):
    """A GGUF decoder on one llama.cpp context; see the module docstring."""

    task = "generate"

    def __init__(self, model: Model, path: Path, device: str, options: LlamaCppOptions):
        self.model, self.device = model, device
        if device == "cpu":
            self.draft_token_cost = CPU_DRAFT_TOKEN_COST
        self.max_context = model.max_context
        self.vocab = model.vocab
        item = KV_ITEM_BYTES[options.kv_type]
        self.kv_layout = KVLayout(bytes_per_token=int(2 * model.n_layer * model.n_head_kv * model.head_dim * item),
                                  block_size=BLOCK_SIZE, contiguous=True, max_cached_tokens=options.max_cached_tokens)
        self._weights = path.stat().st_size
        self._context: ctypes.c_void_p | None = None
        self._memory: ctypes.c_void_p | None = None
        self._blocks_per_slot = 0
        self._batch = _Batch(BATCH_TOKENS)
        #: KV cells llama.cpp allocated (it writes them all at creation): the budget's and a micro-batch.
        self.kv_cells = 0

    # -- the cache -----------------------------------------------------------------
    def allocate_cache(self, num_blocks: int, num_slots: int, capacity_blocks: int | None = None) -> None:
        self._blocks_per_slot = num_blocks // num_slots
        if self._blocks_per_slot < 1:
            raise UnsupportedError(f"a cache of {num_blocks} blocks has no room for {num_slots} slots")
        self._close_context()
        # Cells for the budget, and a micro-batch more: llama.cpp places a batch's tokens
        # before the engine's bookkeeping can give back a rejected draft's cells.
        positions = (capacity_blocks or num_blocks) * BLOCK_SIZE + UBATCH_TOKENS
        self._context = self.model.context(n_ctx=positions, n_seq=num_slots)
        self.kv_cells = llama.llama_n_ctx(self._context)
        self._memory = llama.llama_get_memory(self._context)
        # The engine allocates its cache once the model and tokenizer are loaded: what their
        # loads parsed and freed (GGUF metadata, tokenizer.json) would stay resident otherwise.
        # Not after ``logits()`` frees its context: with a trim there, the next request hung
        # in ``llama_decode`` (docs/BENCHMARKS.md, issue 15).
        from llmk.memory import trim_heap

        trim_heap()

    def _require(self) -> ctypes.c_void_p:
        if self._context is None:
            raise UnsupportedError("allocate_cache() must be called before forward()")
        return self._context

    def _where(self, block: int) -> tuple[int, int]:
        """The slot (sequence id) and first position of ``block``."""
        slot, index = divmod(block, self._blocks_per_slot)
        return slot, index * BLOCK_SIZE

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self._require()
        for src, dst in pairs:
            (src_slot, start), (dst_slot, dst_start) = self._where(src), self._where(dst)
            if start != dst_start:  # the engine reuses a prefix at its own positions
                raise RuntimeFailure("llamacpp", f"cannot move cached positions {start} to {dst_start}")
            llama.llama_memory_seq_rm(self._memory, dst_slot, start, start + BLOCK_SIZE)
            llama.llama_memory_seq_cp(self._memory, src_slot, dst_slot, start, start + BLOCK_SIZE)

    def release_blocks(self, blocks: list[int]) -> None:
        if self._context is None:
            return
        for block in blocks:
            slot, start = self._where(block)
            llama.llama_memory_seq_rm(self._memory, slot, start, start + BLOCK_SIZE)

    # -- steps ---------------------------------------------------------------------
    def forward(self, steps: list[SequenceStep]) -> np.ndarray:
        context = self._require()
        for step in steps:  # positions at and after start are stale: drafts, a previous tenant
            llama.llama_memory_seq_rm(self._memory, step.slot, step.start, -1)
        outputs = []
        call: list[SequenceStep] = []
        size = 0
        for step in steps:
            for piece in _split(step, BATCH_TOKENS):
                if size + len(piece.tokens) > BATCH_TOKENS:
                    outputs.append(self._decode(context, call, size))
                    call, size = [], 0
                call.append(piece)
                size += len(piece.tokens)
        if call:
            outputs.append(self._decode(context, call, size))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _decode(self, context: ctypes.c_void_p, steps: list[SequenceStep], size: int) -> np.ndarray:
        batch = self._batch
        at = 0
        wanted = 0
        for step in steps:
            n = len(step.tokens)
            batch.token[at:at + n] = step.tokens
            batch.pos[at:at + n] = np.arange(step.start, step.start + n, dtype=np.int32)
            batch.seq[at:at + n] = step.slot
            batch.output[at:at + n] = 0
            if step.logits:
                batch.output[at + n - step.logits:at + n] = 1
                wanted += step.logits
            at += n
        batch.struct.n_tokens = size
        status = on_compute_thread(llama.llama_decode, context, batch.struct)
        if status != 0:
            # 1: no room for the batch in the cache; negative: an error inside llama.cpp.
            why = "no free KV cells for the step" if status == 1 else f"llama_decode returned {status}"
            raise RuntimeFailure("llamacpp", f"a step of {size} tokens failed: {why}")
        if not wanted:
            return np.empty((0, self.vocab), np.float32)
        logits = llama.llama_get_logits(context)
        return np.ctypeslib.as_array(logits, shape=(wanted, self.vocab)).copy()

    # -- scoring -------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Every position's logits, on a context of its own (the serving cache is untouched)."""
        if len(token_ids) > self.max_context:
            raise UnsupportedError(f"{len(token_ids)} tokens exceed the model's context ({self.max_context})")
        context = self.model.context(n_ctx=max(len(token_ids), 16), n_seq=1)
        try:
            rows = []
            for start in range(0, len(token_ids), BATCH_TOKENS):
                chunk = token_ids[start:start + BATCH_TOKENS]
                step = SequenceStep(0, chunk, start, [], logits=len(chunk))
                rows.append(self._decode(context, [step], len(chunk)))
            return np.concatenate(rows)
        finally:
            llama.llama_free(context)

    def memory_bytes(self) -> int:
        # The engine counts its KV budget; the micro-batch of cells beyond it is the runner's.
        extra_cells = UBATCH_TOKENS * self.kv_layout.bytes_per_token if self.kv_cells else 0
        return self._weights + LOAD_OVERHEAD_BYTES[self.task] + extra_cells

    def _close_context(self) -> None:
        if self._context is not None:
            llama.llama_free(self._context)
            self._context = self._memory = None
            self.kv_cells = 0

    def close(self) -> None:
        self._close_context()
        self.model.close()


def _split(step: SequenceStep, limit: int) -> list[SequenceStep]:
    """``step`` in pieces of at most ``limit`` tokens (logits stay with the last piece)."""
    if len(step.tokens) <= limit:
        return [step]
    pieces = []
    for at in range(0, len(step.tokens), limit):
        tokens = step.tokens[at:at + limit]
        after = len(step.tokens) - at - len(tokens)  # positions in later pieces
        wanted = max(0, min(len(tokens), step.logits - after))
        pieces.append(SequenceStep(step.slot, tokens, step.start + at, step.blocks, logits=wanted))
    return pieces


class LlamaCppEncoderRunner(Runner):
    """Last hidden states of a GGUF encoder (pooling is the core's)."""

    task = "embed"

    def __init__(self, model: Model, path: Path, device: str, options: LlamaCppOptions):
        self.model, self.device = model, device
        self.max_context = model.max_context
        self._weights = path.stat().st_size
        self._context: ctypes.c_void_p | None = None
        self._batch = _Batch(BATCH_TOKENS)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self._context is None:
            self._context = self.model.context(n_ctx=min(self.max_context, BATCH_TOKENS), n_seq=1, embeddings=True)
        memory = llama.llama_get_memory(self._context)
        rows, length = input_ids.shape
        hidden = np.zeros((rows, length, self.model.n_embd), np.float32)
        for row in range(rows):  # one sequence per call: an encoder's attention spans its whole batch
            n = int(attention_mask[row].sum())
            if n > BATCH_TOKENS:
                raise UnsupportedError(f"{n} tokens exceed llamacpp's encoder batch ({BATCH_TOKENS})")
            llama.llama_memory_clear(memory, True)
            batch = self._batch
            batch.token[:n] = input_ids[row, :n]
            batch.pos[:n] = np.arange(n, dtype=np.int32)
            batch.seq[:n] = 0
            batch.output[:n] = 1
            batch.struct.n_tokens = n
            status = on_compute_thread(llama.llama_decode, self._context, batch.struct)
            if status != 0:
                raise RuntimeFailure("llamacpp", f"could not encode {n} tokens: llama_decode returned {status}")
            embeddings = llama.llama_get_embeddings(self._context)
            hidden[row, :n] = np.ctypeslib.as_array(embeddings, shape=(n, self.model.n_embd))
        return hidden

    def memory_bytes(self) -> int:
        return self._weights + LOAD_OVERHEAD_BYTES[self.task]

    def close(self) -> None:
        if self._context is not None:
            llama.llama_free(self._context)
            self._context = None
        self.model.close()
