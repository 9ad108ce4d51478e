"""The KV cache manager (``llmk.kv``) on its own: blocks, slots, reservations,
the prefix cache and its eviction, for paged and contiguous layouts. A model of
the cache's contents (which tokens each block holds) checks that every reused
block holds exactly what the new sequence would have computed."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from llmk.backend import KVLayout
from llmk.kv import KVCacheError, KVCacheManager

BLOCK = 4


def manager(contiguous: bool = False, capacity: int = 16, slots: int = 4, context: int = 32,
            max_cached_tokens: int | None = None, **kwargs):
    """A manager with a simulated runner: ``contents[block]`` is what the block holds."""
    contents: dict[int, tuple[int, ...]] = {}

    def copy(pairs):
        for source, target in pairs:
            contents[target] = contents[source]

    def release(blocks):
        for block in blocks:
            contents.pop(block, None)

    layout = KVLayout(bytes_per_token=1, block_size=BLOCK, contiguous=contiguous, max_cached_tokens=max_cached_tokens)
    kv = KVCacheManager(layout,
                        capacity_blocks=capacity, num_slots=slots, max_context=context, copy=copy, release=release,
                        **kwargs)
    return kv, contents


def write(kv, contents, allocation, tokens, start, end):
    """What a runner's step does: cover positions [start, end) and write them."""
    kv.ensure(allocation, end)
    for index in range(start // BLOCK, -(-end // BLOCK)):
        block = allocation.blocks[index]
        old = list(contents.get(block, (None,) * BLOCK))
        for position in range(max(start, index * BLOCK), min(end, (index + 1) * BLOCK)):
            old[position % BLOCK] = tokens[position]
        contents[block] = tuple(old)


def check_prefix(contents, allocation, tokens):
    """Every position the allocation claims to hold holds the sequence's token."""
    for position in range(allocation.reused_tokens):
        assert contents[allocation.blocks[position // BLOCK]][position % BLOCK] == tokens[position]


@pytest.mark.parametrize("contiguous", [False, True])
def test_a_repeated_prompt_reuses_its_full_blocks_but_not_its_last_token(contiguous):
    kv, contents = manager(contiguous)
    prompt = list(range(10, 22))  # 12 tokens: 3 full blocks
    first = kv.admit(prompt, 16)
    assert first.reused_tokens == 0 and first.reserved == 4
    write(kv, contents, first, prompt, 0, 12)
    kv.commit(first, prompt, 12)
    kv.free(first)
    second = kv.admit(prompt, 16)
    assert second.reused_tokens == 8  # the third block holds the last token, which must be computed
    check_prefix(contents, second, prompt)
    assert kv.stats().hit_rate == pytest.approx(8 / 24)


@pytest.mark.parametrize("contiguous", [False, True])
def test_prefixes_are_shared_only_between_sequences_of_the_same_root(contiguous):
    """A LoRA adapter changes every cached key and value: its sequences hash from their own root."""
    kv, contents = manager(contiguous)
    prompt = list(range(10, 22))
    first = kv.admit(prompt, 16)
    write(kv, contents, first, prompt, 0, 12)
    kv.commit(first, prompt, 12)
    kv.free(first)
    adapted = kv.admit(prompt, 16, root=b"adapter-a")
    assert adapted.reused_tokens == 0
    write(kv, contents, adapted, prompt, 0, 12)
    kv.commit(adapted, prompt, 12)
    kv.free(adapted)
    assert kv.admit(prompt, 16, root=b"adapter-a").reused_tokens == 8
    assert kv.admit(prompt, 16, root=b"adapter-b").reused_tokens == 0


def test_paged_sequences_share_prefix_blocks():
    kv, contents = manager()
    prompt = list(range(12))
    first = kv.admit(prompt + [99], 20)
    write(kv, contents, first, prompt + [99], 0, 13)
    kv.commit(first, prompt + [99], 13)
    second = kv.admit(prompt + [77], 20)  # while the first still runs
    assert second.blocks == first.blocks[:3] and second.reused_tokens == 12
    assert kv.used == len(first.blocks)  # shared, not copied


def test_contiguous_sequences_copy_a_prefix_held_by_a_busy_slot():
    kv, contents = manager(contiguous=True)
    prompt = list(range(12))
    first = kv.admit(prompt + [99], 20)
    write(kv, contents, first, prompt + [99], 0, 13)
    kv.commit(first, prompt + [99], 13)
    second = kv.admit(prompt + [77], 20)
    assert second.slot != first.slot and second.reused_tokens == 12
    assert all(block // kv.per_slot == second.slot for block in second.blocks)
    check_prefix(contents, second, prompt + [77])


def test_contiguous_prefers_the_free_slot_that_already_holds_the_prefix():
    kv, contents = manager(contiguous=True)
    prompt = list(range(12))
    allocation = kv.admit(prompt, 16)
    slot = allocation.slot
    write(kv, contents, allocation, prompt, 0, 12)
    kv.commit(allocation, prompt, 12)
    kv.free(allocation)
    other = kv.admit([50, 51, 52, 53, 54], 8)  # no match: it takes another slot, keeping the cached one
    assert other.slot != slot
    again = kv.admit(prompt + [1], 16)
    assert again.slot == slot and again.reused_tokens == 12


def test_admission_reserves_up_to_max_length_and_refuses_what_does_not_fit():
    kv, _ = manager(capacity=10)
    first = kv.admit([1, 2, 3], 24)  # 6 blocks reserved
    assert kv.available == 4
    assert kv.admit([4, 5, 6], 24) is None  # would need 6: it waits
    second = kv.admit([4, 5, 6], 16)
    assert second is not None and kv.available == 0
    kv.free(first)
    assert kv.available == 6 and not kv.fits_ever(44)


def test_cached_blocks_are_evicted_least_recently_used_first_and_only_when_needed():
    kv, contents = manager(capacity=6, slots=2)
    old, recent = [1] * 8, [2] * 8
    for prompt in (old, recent):
        allocation = kv.admit(prompt + [0], 12)
        write(kv, contents, allocation, prompt + [0], 0, 9)
        kv.commit(allocation, prompt + [0], 9)
        kv.free(allocation)
    assert kv.cached == 4
    big = kv.admit([3] * 9, 12)  # 3 new blocks: one cached block must go, the oldest
    kv.ensure(big, 12)
    assert kv.cached == 3
    hit = kv.admit(recent + [5], 12)
    assert hit.reused_tokens == 8  # the recent prefix survived
    kv.free(hit)
    miss = kv.admit(old + [5], 12)
    assert miss.reused_tokens == 4  # the old one lost its second (tail) block first


@pytest.mark.parametrize("contiguous", [False, True])
def test_a_runner_that_bounds_its_idle_cache_keeps_only_the_most_recent_blocks(contiguous):
    kv, contents = manager(contiguous, capacity=16, slots=2, max_cached_tokens=2 * BLOCK)
    prompts = [[1] * 8, [2] * 8, [3] * 8]  # 2 full blocks each, then the token that is not cached
    for prompt in prompts:
        allocation = kv.admit(prompt + [0], 12)
        write(kv, contents, allocation, prompt + [0], 0, 9)
        kv.commit(allocation, prompt + [0], 9)
        kv.free(allocation)
        assert kv.cached <= 2  # room for 12 cached blocks, but the runner keeps 2
    if contiguous:  # the others were released to the runner (its cells freed), not just forgotten
        assert len(contents) == 2
    newest = kv.admit(prompts[2] + [5], 12)
    assert newest.reused_tokens == 8
    check_prefix(contents, newest, prompts[2] + [5])
    kv.free(newest)
    assert kv.admit(prompts[0] + [5], 12).reused_tokens == 0


def test_truncate_returns_blocks_but_never_cuts_final_tokens():
    kv, contents = manager()
    tokens = list(range(14))
    allocation = kv.admit(tokens[:6], 24)
    write(kv, contents, allocation, tokens, 0, 14)
    kv.commit(allocation, tokens, 6)  # drafts after position 6 are not final
    reserved = allocation.reserved
    kv.truncate(allocation, 7)
    assert len(allocation.blocks) == 2 and allocation.reserved == reserved + 2
    with pytest.raises(KVCacheError, match="the first 4 are final"):
        kv.truncate(allocation, 3)


def test_prefix_caching_off_reuses_nothing():
    kv, contents = manager(prefix_caching=False)
    prompt = list(range(12))
    allocation = kv.admit(prompt, 16)
    write(kv, contents, allocation, prompt, 0, 12)
    kv.commit(allocation, prompt, 12)
    kv.free(allocation)
    assert kv.admit(prompt, 16).reused_tokens == 0 and kv.cached == 0


class CacheMachine(RuleBasedStateMachine):
    """Random admissions, steps, frees and rollbacks: the accounting never
    overcommits, and every reused prefix holds exactly the sequence's tokens."""

    def __init__(self):
        super().__init__()
        self.contiguous = False
        self.kv, self.contents = manager(capacity=14, slots=3, context=24)
        self.running: list[tuple[object, list[int], int]] = []  # (allocation, tokens, written)

    @rule(contiguous=st.booleans())
    def layout(self, contiguous):
        if not self.running and self.kv.used == 0:
            self.contiguous = contiguous
            self.kv, self.contents = manager(contiguous, capacity=14, slots=3, context=24)

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9]]),
          tail=st.lists(st.integers(0, 3), min_size=1, max_size=6), budget=st.integers(1, 8))
    def admit(self, prefix, tail, budget):
        prompt = prefix + tail
        allocation = self.kv.admit(prompt, len(prompt) + budget)
        if allocation is not None:
            check_prefix(self.contents, allocation, prompt)
            self.running.append((allocation, prompt + [7] * budget, allocation.reused_tokens))

    @rule(data=st.data())
    def step(self, data):
        if not self.running:
            return
        index = data.draw(st.integers(0, len(self.running) - 1))
        allocation, tokens, written = self.running[index]
        end = min(len(tokens), written + data.draw(st.integers(1, 6)))
        if end > written:
            write(self.kv, self.contents, allocation, tokens, written, end)
            self.kv.commit(allocation, tokens, end)
            self.running[index] = (allocation, tokens, end)

    @rule(data=st.data())
    def finish(self, data):
        if self.running:
            allocation, _, _ = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
            self.kv.free(allocation)

    @invariant()
    def never_overcommitted(self):
        kv = self.kv
        assert 0 <= kv.used and 0 <= kv.reserved
        assert kv.used + kv.reserved <= kv.capacity
        assert kv.used + kv.cached <= kv.capacity
        assert kv.used == sum(1 for refs in kv._refs if refs)  # noqa: SLF001 - the invariant's own check


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase


def test_a_slot_never_copies_from_itself_after_a_partial_eviction():
    # Found by the soak run: slot 0 caches a prompt's blocks 0-2, loses block 1 to LRU
    # eviction, and slot 1 caches all three. A new sequence of that prompt placed in slot 0
    # reuses block 0 in place and must copy blocks 1 and 2 from slot 1, never "copy" its own
    # stale block 2 onto itself ("block 2 of slot 0 is already in use").
    kv, contents = manager(contiguous=True, capacity=12, slots=2, context=32)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks that may be reused
    first = kv.admit(prompt, 16)
    write(kv, contents, first, prompt, 0, 13)
    kv.commit(first, prompt, 13)
    second = kv.admit(prompt, 16)  # slot 0 is busy: slot 1, its prefix copied from slot 0
    assert second.slot != first.slot and second.reused_tokens == 12
    write(kv, contents, second, prompt, 12, 13)
    kv.commit(second, prompt, 13)
    kv.free(second)
    kv.free(first)
    stale = first.slot * kv.per_slot + 1  # LRU takes this one block of slot 0 only
    kv._evictable.pop(stale)
    kv._unhash(stale)
    other = kv.admit([7] * 13, 16)  # a different prompt takes slot 1, the one freed longest ago
    assert other.slot == second.slot
    again = kv.admit(prompt, 16)
    assert again.slot == first.slot and again.reused_tokens == 12
    check_prefix(contents, again, prompt)  # blocks 1 and 2 were copied from slot 1, block 0 kept
    write(kv, contents, again, prompt, 12, 13)
    check_prefix(contents, again, prompt)
