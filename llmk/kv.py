"""The KV cache manager: which blocks of a runner's cache each sequence holds.

The cache is split into blocks of ``block_size`` token positions (see
``llmk.backend.KVLayout``). This module hands blocks out, counts them against
the cache's capacity and keeps the prefix cache; the runner only ever reads and
writes the blocks a step names. The design is vLLM's (``KVCacheManager``,
``get_computed_blocks``), with llama.cpp's slots for contiguous runtimes:

- A block is *free*, *used* (held by one or more running sequences) or *cached*:
  no sequence holds it, but it still holds a full block of some earlier
  sequence's tokens and can be found by the hash of those tokens and every
  token before them. Cached blocks are evicted least recently used first, and
  only when a block is needed: the prefix cache lives inside the KV budget. A
  runner may bound them further (``KVLayout.max_cached_tokens``: llama.cpp's
  steps slow down with every cell in use, cached or not).
- Admission reserves what a sequence may grow to (its prompt plus
  ``max_tokens``), so a running sequence never runs out of cache and nothing is
  preempted: a request that does not fit waits in the queue for room.
- A new prompt starts with the longest run of cached full blocks that match it
  (at most all but its last token, which must be computed for its logits).
  Paged runners share those blocks; contiguous runners keep each sequence in
  one slot, so the sequence goes to the free slot already holding the longest
  match, and the rest of the match is copied in from other slots.
- Only blocks of tokens that are final are hashed (never speculative drafts),
  so a rollback (``truncate``) never cuts into a block another sequence shares.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from llmk.errors import LlmkError

if TYPE_CHECKING:
    from llmk.backend import KVLayout


class KVCacheError(LlmkError):
    """The KV cache cannot do what was asked (a bug in its caller, or a request
    larger than the whole cache)."""


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _locked(method: _Method) -> _Method:
    """Run a ``KVCacheManager`` change as one step for readers of ``stats``."""
    @wraps(method)
    def locked(self: KVCacheManager, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return locked  # type: ignore[return-value]


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its tokens and, through ``parent``, every token before
    it. A cryptographic digest, so that no prompt can be crafted to collide with
    another's prefix and read its cache."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def config_bytes_per_token(config_dir: Path, dtype: str) -> int:
    """KV bytes of one token position of a Hugging Face decoder, from its
    ``config.json`` (0 when there is none): what the memory estimate counts
    before the runner is loaded and can say exactly."""
    try:
        config = json.loads((config_dir / "config.json").read_text())
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        layers = config["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 0
    return layers * 2 * kv_heads * head_dim * (4 if dtype == "fp32" else 2)


def config_max_context(config_dir: Path, default: int = 2048) -> int:
    try:
        config = json.loads((config_dir / "config.json").read_text())
        return int(config.get("max_position_embeddings") or default)
    except (OSError, ValueError, TypeError):
        return default


@dataclass
class KVAllocation:
    """One sequence's share of the cache."""

    slot: int
    #: Block table: block ``blocks[p // block_size]`` holds position ``p``.
    blocks: list[int] = field(default_factory=list)
    #: Blocks still reserved for the sequence to grow into.
    reserved: int = 0
    #: Chained hashes of its first ``len(hashes)`` blocks, which are full and final.
    hashes: list[bytes] = field(default_factory=list)
    #: Prompt positions found in the prefix cache at admission.
    reused_tokens: int = 0
    #: The hash chain's root: what besides the tokens decides the cached keys and values
    #: (a LoRA adapter changes them); empty for the model alone.
    root: bytes = b""


@dataclass
class KVStats:
    """What the prefix cache saved, and how full the cache is."""

    capacity_blocks: int
    block_size: int
    used_blocks: int
    cached_blocks: int
    reserved_blocks: int
    prompt_tokens: int  # prompt tokens looked up in the prefix cache
    reused_tokens: int  # of those, found cached (not computed again)

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"kv_capacity_tokens": self.capacity_blocks * self.block_size,
                "kv_used_tokens": self.used_blocks * self.block_size,
                "kv_cached_tokens": self.cached_blocks * self.block_size,
                "kv_reserved_tokens": self.reserved_blocks * self.block_size,
                "prefix_cache_prompt_tokens": self.prompt_tokens,
                "prefix_cache_reused_tokens": self.reused_tokens,
                "prefix_cache_hit_rate": round(self.hit_rate, 4)}


class KVCacheManager:
    """Blocks, slots and the prefix cache of one loaded model. The model's
    scheduler thread is its only writer; ``stats`` may be read from any thread
    (each change and each read hold ``_lock``, so a reader never sees a sequence
    half freed while another is admitted).

    ``capacity_blocks`` is how many blocks may hold data at once (the KV budget).
    A paged layout has exactly that many blocks. A contiguous layout has
    ``num_slots * blocks_per_slot`` (every slot can reach the model's context),
    of which at most ``capacity_blocks`` are ever in use or cached; the runner
    commits memory only for blocks it writes and may release the others
    (``release``). ``copy(pairs)`` and ``release(blocks)`` are the runner's
    ``copy_blocks`` and ``release_blocks``.
    """

    def __init__(self, layout: KVLayout, *, capacity_blocks: int, num_slots: int, max_context: int,
                 prefix_caching: bool = True, copy: Callable[[list[tuple[int, int]]], None] | None = None,
                 release: Callable[[list[int]], None] | None = None):
        if capacity_blocks < 1 or num_slots < 1:
            raise KVCacheError(f"a KV cache needs blocks and slots (got {capacity_blocks} blocks, {num_slots} slots)")
        self.block_size = layout.block_size
        self.contiguous = layout.contiguous
        self.num_slots = num_slots
        self.prefix_caching = prefix_caching
        self.per_slot = layout.blocks_per_slot(max_context) if self.contiguous else 0
        self.num_blocks = num_slots * self.per_slot if self.contiguous else capacity_blocks
        self.capacity = min(capacity_blocks, self.num_blocks)
        self.max_cached = (self.blocks_for(layout.max_cached_tokens) if layout.max_cached_tokens is not None
                           else self.capacity)
        self._copy, self._release = copy, release
        self._refs = [0] * self.num_blocks
        self._hash: list[bytes | None] = [None] * self.num_blocks
        self._by_hash: dict[bytes, dict[int, None]] = {}  # hash -> blocks holding it (ordered set)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently used first
        self._free: list[int] = [] if self.contiguous else list(range(self.num_blocks - 1, -1, -1))
        self._free_slots: dict[int, int] = {slot: 0 for slot in range(num_slots)}  # slot -> when it was freed
        self._clock = itertools.count(1)
        self._lock = threading.Lock()
        self.used = 0  # blocks with a reference
        self.reserved = 0
        self.prompt_tokens = 0
        self.reused_tokens = 0

    # -- sizes -------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def cached(self) -> int:
        return len(self._evictable)

    @property
    def available(self) -> int:
        """Blocks a new sequence may still reserve (cached blocks can be evicted)."""
        return self.capacity - self.used - self.reserved

    def fits_ever(self, max_length: int) -> bool:
        """Whether a sequence of ``max_length`` positions fits in an empty cache."""
        return self.blocks_for(max_length) <= self.capacity

    def stats(self) -> KVStats:
        with self._lock:
            return KVStats(self.capacity, self.block_size, self.used, self.cached, self.reserved,
                           self.prompt_tokens, self.reused_tokens)

    # -- a sequence's life ---------------------------------------------------------------
    @_locked
    def admit(self, prompt: Sequence[int], max_length: int, *, slot: int | None = None,
              root: bytes = b"") -> KVAllocation | None:
        """Take a slot (``slot`` itself when given: a draft model's cache mirrors its
        target's slots), reuse the longest cached prefix of ``prompt`` and reserve
        blocks up to ``max_length`` positions; ``None`` when there is no free slot
        or not enough room now (the caller waits and asks again). Prefixes are shared
        only between sequences of the same ``root`` (their adapter)."""
        if not self._free_slots:
            return None
        if slot is not None and slot not in self._free_slots:
            raise KVCacheError(f"slot {slot} is not free")
        hashes = self._prefix_hashes(prompt, root) if self.prefix_caching else []
        needed = self.blocks_for(max_length)
        if self.contiguous:
            slot, own = self._pick_slot(hashes) if slot is None else (slot, self._own_match(slot, hashes))
            sources = self._copy_sources(hashes, own, slot)
            # Every block of the sequence becomes used (reused in place, copied in, or new),
            # and cached copy sources are held while they are read.
            cost = needed + sum(1 for b in sources if self._refs[b] == 0)
        else:
            if slot is None:
                slot = min(self._free_slots, key=self._free_slots.__getitem__)
            matched = self._match_paged(hashes)
            cost = needed - len(matched) + sum(1 for b in matched if self._refs[b] == 0)
        if cost > self.available:
            return None
        del self._free_slots[slot]
        allocation = KVAllocation(slot, root=root)
        if self.contiguous:
            self._attach_contiguous(allocation, hashes, own, sources)
        else:
            for block in matched:
                self._take(block)
            allocation.blocks = list(matched)
            allocation.hashes = hashes[:len(matched)]
        allocation.reserved = needed - len(allocation.blocks)
        self.reserved += allocation.reserved
        allocation.reused_tokens = len(allocation.blocks) * self.block_size
        self.prompt_tokens += len(prompt)
        self.reused_tokens += allocation.reused_tokens
        return allocation

    @_locked
    def ensure(self, allocation: KVAllocation, length: int) -> None:
        """Give ``allocation`` blocks for positions up to ``length`` (before a step writes them)."""
        while len(allocation.blocks) * self.block_size < length:
            index = len(allocation.blocks)
            block = self._block_for(allocation.slot, index)
            # The reservation shrinks before the block is counted as used: gauges read from
            # other threads (metrics, status) never see a block counted twice.
            if allocation.reserved > 0:
                allocation.reserved -= 1
                self.reserved -= 1
            self._take(block)
            allocation.blocks.append(block)

    def commit(self, allocation: KVAllocation, tokens: Sequence[int], final: int) -> None:
        """Positions below ``final`` hold final tokens (``tokens[:final]``): hash the
        blocks they fill, so that later prompts can reuse them."""
        if not self.prefix_caching:
            return
        full = min(final // self.block_size, len(allocation.blocks))
        while len(allocation.hashes) < full:
            index = len(allocation.hashes)
            parent = allocation.hashes[-1] if allocation.hashes else allocation.root
            key = chain_hash(parent, tokens[index * self.block_size:(index + 1) * self.block_size])
            allocation.hashes.append(key)
            block = allocation.blocks[index]
            if self._hash[block] is None:
                self._hash[block] = key
                self._by_hash.setdefault(key, {})[block] = None

    @_locked
    def truncate(self, allocation: KVAllocation, length: int) -> None:
        """Keep positions below ``length`` (a rollback of tokens that were never
        final); blocks past it go back to the sequence's reservation."""
        if length < len(allocation.hashes) * self.block_size:
            raise KVCacheError(f"cannot roll back to {length} tokens: the first "
                               f"{len(allocation.hashes) * self.block_size} are final (and may be shared)")
        keep = self.blocks_for(length)
        dropped = []
        while len(allocation.blocks) > keep:
            dropped.append(allocation.blocks.pop())
        # No longer used before reserved again: gauges read from other threads never
        # see these blocks counted twice (as in ``ensure``, the other way round).
        self._drop(dropped)
        allocation.reserved += len(dropped)
        self.reserved += len(dropped)

    @_locked
    def free(self, allocation: KVAllocation) -> None:
        """The sequence is done: its blocks go back (hashed ones stay cached)."""
        self._drop(allocation.blocks[::-1])  # the tail is evicted first
        allocation.blocks = []
        self.reserved -= allocation.reserved
        allocation.reserved = 0
        self._free_slots[allocation.slot] = next(self._clock)

    # -- blocks ----------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
            self.used += 1
        self._refs[block] += 1

    def _drop(self, blocks: list[int]) -> None:
        emptied = []
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            self.used -= 1
            if self._hash[block] is not None:
                self._evictable[block] = None
            elif self.contiguous:
                emptied.append(block)
            else:
                self._free.append(block)
        if emptied:
            self._release_now(emptied)
        if len(self._evictable) > self.max_cached:  # the runner bounds its idle cache
            self._evict(len(self._evictable) - self.max_cached)

    def _block_for(self, slot: int, index: int) -> int:
        """A block for position block ``index`` of the sequence in ``slot``."""
        if self.contiguous:
            if index >= self.per_slot:
                raise KVCacheError(f"slot {slot} has room for {self.per_slot} blocks")
            block = slot * self.per_slot + index
            if self._refs[block]:
                raise KVCacheError(f"block {block} of slot {slot} is already in use")
            if self._hash[block] is not None:  # stale: the slot's previous sequence cached it
                self._evictable.pop(block, None)
                self._unhash(block)
            elif self.used + self.cached >= self.capacity:
                self._evict(1)
            return block
        if not self._free:
            self._evict(1)
        return self._free.pop()

    def _evict(self, count: int) -> None:
        if len(self._evictable) < count:
            raise KVCacheError("the KV cache is full")  # admission reserves room, so this is a bug
        victims = []
        for _ in range(count):
            block, _ = self._evictable.popitem(last=False)
            self._unhash(block)
            victims.append(block)
        if self.contiguous:
            self._release_now(victims)
        else:
            self._free.extend(victims)

    def _unhash(self, block: int) -> None:
        key = self._hash[block]
        self._hash[block] = None
        holders = self._by_hash.get(key)
        if holders is not None:
            holders.pop(block, None)
            if not holders:
                del self._by_hash[key]

    def _release_now(self, blocks: list[int]) -> None:
        if self._release is not None:
            self._release(blocks)

    # -- the prefix cache -----------------------------------------------------------
    def _prefix_hashes(self, prompt: Sequence[int], root: bytes) -> list[bytes]:
        """Hashes of the prompt's full blocks that may be reused: all but the last token stays computable."""
        hashes: list[bytes] = []
        parent = root
        for index in range((len(prompt) - 1) // self.block_size):
            parent = chain_hash(parent, prompt[index * self.block_size:(index + 1) * self.block_size])
            hashes.append(parent)
        return hashes

    def _match_paged(self, hashes: list[bytes]) -> list[int]:
        matched = []
        for key in hashes:
            holders = self._by_hash.get(key)
            if not holders:
                break
            matched.append(next(iter(holders)))
        for block in matched:  # found again: most recently used now
            if block in self._evictable:
                self._evictable.move_to_end(block)
        return matched

    def _pick_slot(self, hashes: list[bytes]) -> tuple[int, int]:
        """The free slot whose own blocks match the longest prefix (ties: the one
        freed longest ago, keeping recent caches), and that match's length."""
        best, best_own = None, -1
        for slot in sorted(self._free_slots, key=self._free_slots.__getitem__):
            own = self._own_match(slot, hashes)
            if own > best_own:
                best, best_own = slot, own
        assert best is not None
        return best, best_own

    def _own_match(self, slot: int, hashes: list[bytes]) -> int:
        """How many of the prefix blocks ``hashes`` the slot's own blocks still hold."""
        own = 0
        for index, key in enumerate(hashes):
            if self._hash[slot * self.per_slot + index] != key:
                break
            own += 1
        return own

    def _copy_sources(self, hashes: list[bytes], own: int, slot: int) -> list[int]:
        """Blocks in other slots holding the prefix blocks after the first ``own``. A
        block of ``slot`` itself is never a source: it is where a copy would go (it can
        still hold a later prefix block after an earlier one was evicted)."""
        sources = []
        for key in hashes[own:]:
            holder = next((b for b in self._by_hash.get(key, ()) if b // self.per_slot != slot), None)
            if holder is None:
                break
            sources.append(holder)
        return sources

    def _attach_contiguous(self, allocation: KVAllocation, hashes: list[bytes], own: int,
                           sources: list[int]) -> None:
        slot = allocation.slot
        for index in range(own):  # cached in this very slot: reuse in place
            block = slot * self.per_slot + index
            self._take(block)
            allocation.blocks.append(block)
        for source in sources:  # held while copied, so that making room cannot evict them
            self._take(source)
        copies = []
        for source in sources:
            target = self._block_for(slot, len(allocation.blocks))
            self._take(target)
            allocation.blocks.append(target)
            copies.append((source, target))
        if copies:
            if self._copy is None:
                raise KVCacheError("a contiguous KV cache needs the runner's copy_blocks")
            self._copy(copies)
        self._drop(sources)
        allocation.hashes = hashes[:len(allocation.blocks)]
        for block, key in zip(allocation.blocks[own:], allocation.hashes[own:]):
            self._hash[block] = key
            self._by_hash.setdefault(key, {})[block] = None
