"""A Hugging Face directory to one GGUF file, for the llama.cpp backend.

``export_gguf`` is what ``LlamaCppBackend.export`` runs (inside an atomic cache
build) when a source is a Hugging Face directory. It is written with the ``gguf``
package after llama.cpp's own ``convert_hf_to_gguf.py`` (its ``conversion/llama.py``
and ``bert.py`` in the llama.cpp that llama-cpp-python vendors), for the
architectures in ``CONVERTERS``; any other is refused by name:

- ``LlamaForCausalLM`` (SmolLM, SmolLM2, TinyLlama, Llama 2 and 3): llama.cpp's
  ``llama`` graph. Hugging Face stores the query and key projections with each
  head's rotary pairs split in halves; llama.cpp rotates adjacent pairs, so those
  two weights are permuted back (``_unpermute``). A tied output head is not
  written: llama.cpp reads the embedding table when ``output.weight`` is absent.
- ``BertModel`` (sentence-transformers encoders such as all-MiniLM-L6-v2):
  llama.cpp's ``bert`` graph, WordPiece vocabulary (``tokenizer.ggml.model = "bert"``).

Tensors are read one at a time from the safetensors files and streamed into the
GGUF, so a conversion holds one tensor in memory, never the whole model.

The tokenizer is written too (tokens, merges or scores, special ids, the chat
template), although llmk never asks llama.cpp to tokenize: the core tokenizes
with the source's Hugging Face files. It keeps the file whole for any other
program that reads it, and llama.cpp refuses to load a model without a vocabulary.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np
import torch

from llmk.artifact import Artifact
from llmk.errors import SourceError, UnsupportedError
from llmk.logs import get_logger

log = get_logger("llmk.llamacpp")


Q = gguf.GGMLQuantizationType
#: Largest finite float16.
F16_MAX = 65504.0
#: What ``writer.add_tensor_info`` needs per output type: NumPy dtype (bf16 travels as raw uint16).
NUMPY_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}


def export_gguf(source: Artifact, out_file: Path, *, dtype: str) -> None:
    """Convert the Hugging Face directory ``source.path`` into the GGUF file ``out_file``.

    Weight types (``_Converter.ggml_type``): norms, biases and other 1-D tensors are
    always f32 (llama.cpp's kernels for them take f32 only). 2-D weights are f16 when
    ``dtype`` is fp16 or bf16: llama.cpp's 16-bit float matrix kernels are its f16
    ones on every device, and a weight outside f16's range is written in its own
    type instead of overflowing. With fp32 they keep the checkpoint's own precision:
    an f32 checkpoint stays f32 (the same numbers as torch on the same directory),
    a bf16 or f16 one stays 16-bit, since widening it would double the file and the
    memory traffic of every token (an 8B bf16 checkpoint would become 32 GB) and add
    no information. ``quantize`` then makes smaller types from this file.
    """
    config = _read_json(source, source.path / "config.json")
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type", "unknown")
    converter = CONVERTERS.get(architecture)
    if converter is None:
        raise UnsupportedError(
            f"llamacpp cannot convert {source.source} ({architecture}) to GGUF; it converts: "
            f"{', '.join(CONVERTERS)}. Give it a .gguf file of the model, or choose another backend")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise UnsupportedError(f"llamacpp writes GGUF weights in fp32, fp16 or bf16 terms, not {dtype!r}")
    started = time.perf_counter()
    converter(source, config, dtype).write(out_file)
    log.info("llamacpp.converted", source=source.source, architecture=architecture, dtype=dtype,
             bytes=out_file.stat().st_size, seconds=round(time.perf_counter() - started, 2))


# -- reading the checkpoint ---------------------------------------------------------

def _read_json(source: Artifact, path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SourceError(source.source, f"cannot read {path}: {error}") from None


class _Safetensors:
    """Every tensor of a directory's ``*.safetensors`` files (sharded or not), read one at a time."""

    def __init__(self, source: Artifact):
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for file in sorted(source.path.glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                self._where[name] = handle
        if not self._where:
            raise SourceError(source.source, f"no safetensors weights in {source.path}")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._where[name].get_slice(name).get_dtype()  # "F32", "BF16", "F16", "I64", ...

    def load(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


@dataclass
class _Tensor:
    """One tensor of the GGUF: its name, shape (PyTorch order), the checkpoint's type, how to read it."""

    name: str
    shape: tuple[int, ...]
    source_dtype: str
    load: Callable[[], torch.Tensor]
    ggml_type: Any = None


# -- the converters -----------------------------------------------------------------

class _Converter:
    """What every architecture shares: hyperparameters, vocabulary, typed tensors, the write."""

    arch: ClassVar[gguf.MODEL_ARCH]
    #: GGUF tensors kept in f32 whatever their shape (llama.cpp reads them as f32).
    f32_tensors: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, source: Artifact, config: dict[str, Any], dtype: str):
        self.source, self.config, self.dtype = source, config, dtype
        self.directory = source.path
        self.weights = _Safetensors(source)
        self.block_count = int(config["num_hidden_layers"])
        self.name_map = gguf.get_tensor_name_map(self.arch, self.block_count)
        self.writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[self.arch])

    # -- per architecture -----------------------------------------------------------
    def check(self) -> None:
        """Refuse what llama.cpp's graph for the architecture would compute differently."""

    def hyperparameters(self) -> None:
        raise NotImplementedError

    def vocabulary(self) -> None:
        raise NotImplementedError

    def source_tensors(self) -> Iterator[tuple[str, str]]:
        """``(checkpoint name, GGUF name)`` of every tensor to write."""
        raise NotImplementedError

    def transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The checkpoint tensor ``name`` as llama.cpp lays it out."""
        return tensor

    def extra_tensors(self) -> Iterator[_Tensor]:
        """Tensors llama.cpp needs that the checkpoint does not hold."""
        return iter(())

    # -- shared ---------------------------------------------------------------------
    def gguf_name(self, name: str) -> str:
        mapped = self.name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedError(f"llamacpp cannot convert {self.source.source}: no GGUF name for its tensor "
                                   f"{name!r} in llama.cpp's {gguf.MODEL_ARCH_NAMES[self.arch]} graph")
        return mapped

    def tensors(self) -> list[_Tensor]:
        tensors = [
            _Tensor(gguf_name, self.weights.shape(name), self.weights.dtype(name),
                    lambda name=name: self.transform(name, self.weights.load(name)))
            for name, gguf_name in self.source_tensors()
        ]
        return [*tensors, *self.extra_tensors()]

    def ggml_type(self, tensor: _Tensor) -> Any:
        """See ``export_gguf``'s docstring."""
        if len(tensor.shape) <= 1 or not tensor.name.endswith(".weight") or tensor.name.endswith("_norm.weight") \
                or tensor.name in self.f32_tensors:
            return Q.F32
        own = {"F16": Q.F16, "BF16": Q.BF16}.get(tensor.source_dtype, Q.F32)
        if self.dtype == "fp32" or own == Q.F16:
            return own
        peak = float(tensor.load().abs().max())
        if peak > F16_MAX:  # would overflow to inf in f16
            log.warning("llamacpp.convert_kept_type", tensor=tensor.name, peak=peak, type=own.name)
            return own
        return Q.F16

    def write(self, out_file: Path) -> None:
        self.check()
        writer = self.writer
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(self.config.get("_name_or_path") or self.config.get("_model_name_or_path")
                            or self.directory.name))
        writer.add_block_count(self.block_count)
        self.hyperparameters()
        self.vocabulary()
        tensors = self.tensors()
        for tensor in tensors:
            tensor.ggml_type = self.ggml_type(tensor)
            size = math.prod(tensor.shape) * np.dtype(NUMPY_TYPES[tensor.ggml_type]).itemsize
            writer.add_tensor_info(tensor.name, tensor.shape, NUMPY_TYPES[tensor.ggml_type], size,
                                   raw_dtype=tensor.ggml_type)
        writer.add_file_type(_file_type(tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file(path=out_file)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:  # one tensor in memory at a time, in the order of the tensor infos
            writer.write_tensor_data(_as_numpy(tensor.load(), tensor.ggml_type))
        writer.close()


def _file_type(tensors: list[_Tensor]) -> gguf.LlamaFileType:
    """``general.file_type``: the type of most 2-D weights."""
    counts = Counter(t.ggml_type for t in tensors if len(t.shape) >= 2)
    common = counts.most_common(1)[0][0] if counts else Q.F32
    return {Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}.get(
        common, gguf.LlamaFileType.ALL_F32)


def _as_numpy(tensor: torch.Tensor, ggml_type: Any) -> np.ndarray:
    if ggml_type == Q.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    torch_type = torch.float16 if ggml_type == Q.F16 else torch.float32
    return np.ascontiguousarray(tensor.to(torch_type).numpy())


class _Llama(_Converter):
    """``LlamaForCausalLM``: after ``conversion/llama.py`` (``LlamaModel``)."""

    arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, source: Artifact, config: dict[str, Any], dtype: str):
        super().__init__(source, config, dtype)
        self.n_head = int(config["num_attention_heads"])
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // self.n_head)
        # transformers 5 says rope_parameters (with rope_theta inside), 4 rope_scaling and rope_theta.
        self.rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        self.rope_type = self.rope.get("rope_type", self.rope.get("type")) or "default"
        self.rope_theta = float(self.rope.get("rope_theta", config.get("rope_theta", 10000.0)))

    def check(self) -> None:
        activation = self.config.get("hidden_act", "silu")
        if activation != "silu":
            raise UnsupportedError(f"llamacpp's llama graph computes SiLU; {self.source.source} uses {activation!r}")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedError(f"llamacpp's converter handles rotary scaling default, linear and llama3, "
                                   f"not {self.rope_type!r} ({self.source.source})")

    def hyperparameters(self) -> None:
        writer, config = self.writer, self.config
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_vocab_size(int(config["vocab_size"]))
        if self.head_dim != int(config["hidden_size"]) // self.n_head:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        if self.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))

    def vocabulary(self) -> None:
        tokenizer_json = _read_json(self.source, self.directory / "tokenizer.json") \
            if (self.directory / "tokenizer.json").is_file() else {}
        model = tokenizer_json.get("model", {})
        if model.get("type") == "BPE" and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel":
            _write_bpe_vocab(self, tokenizer_json)
        elif model.get("type") == "BPE" and model.get("byte_fallback"):
            _write_spm_vocab(self, tokenizer_json)
        else:
            raise UnsupportedError(
                f"llamacpp converts llama tokenizers from tokenizer.json: byte-level BPE (SmolLM, Llama 3) or "
                f"BPE with byte fallback (Llama 2, TinyLlama); {self.source.source} has "
                f"{model.get('type') or 'no tokenizer.json'}")

    def source_tensors(self) -> Iterator[tuple[str, str]]:
        tied = bool(self.config.get("tie_word_embeddings", False))
        for name in self.weights.names():
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue  # recomputed by llama.cpp / the output head is the embedding table
            yield name, self.gguf_name(name)

    def transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return _unpermute(tensor, self.n_head)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return _unpermute(tensor, self.n_head_kv)
        return tensor

    def extra_tensors(self) -> Iterator[_Tensor]:
        if self.rope_type == "llama3":  # Llama 3.1+: per-frequency scaling, as a tensor llama.cpp multiplies in
            factors = _llama3_rope_factors(self.rope, self.rope_theta, self.head_dim)
            yield _Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", tuple(factors.shape),
                          "F32", lambda: factors)


def _unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotary layout (each head's pairs split in halves) back to adjacent pairs:
    ``LlamaModel.permute`` in convert_hf_to_gguf."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _llama3_rope_factors(rope: dict[str, Any], theta: float, dim: int) -> torch.Tensor:
    """``LlamaModel.generate_extra_tensors`` in convert_hf_to_gguf."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


class _Bert(_Converter):
    """``BertModel``: after ``conversion/bert.py`` (``BertModel``), for embeddings."""

    arch = gguf.MODEL_ARCH.BERT
    # convert_hf_to_gguf keeps these in f32 (llama_model_quantize never touches them either).
    f32_tensors = frozenset({"position_embd.weight", "token_types.weight"})
    #: Checkpoint tensors an embedding model does not use.
    skipped = ("embeddings.position_ids", "pooler.", "cls.")

    def check(self) -> None:
        position = self.config.get("position_embedding_type", "absolute")
        activation = self.config.get("hidden_act", "gelu")
        if position != "absolute" or activation != "gelu":
            raise UnsupportedError(f"llamacpp's bert graph computes absolute positions and GELU; "
                                   f"{self.source.source} has {position!r} positions and {activation!r}")

    def hyperparameters(self) -> None:
        writer, config = self.writer, self.config
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
        writer.add_causal_attention(False)
        writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
        pooling = _pooling_type(self.source)
        if pooling is not None:  # llmk pools in the core; written for other readers of the file
            writer.add_pooling_type(pooling)

    def vocabulary(self) -> None:
        path = self.directory / "tokenizer.json"
        model = _read_json(self.source, path).get("model", {}) if path.is_file() else {}
        if model.get("type") != "WordPiece":
            raise UnsupportedError(f"llamacpp converts BERT models with a WordPiece tokenizer.json; "
                                   f"{self.source.source} has {model.get('type') or 'none'}")
        tokens, types, tokenizer = _hf_tokens(self)
        # llama.cpp's WordPiece marks word starts with "▁" and continuations bare (convert's "phantom space").
        tokens = [t if k == gguf.TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
                  for t, k in zip(tokens, types, strict=True)]
        writer = self.writer
        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre("default")  # WordPiece has no pre-tokenizer variants in llama.cpp
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        _write_special_tokens(self, tokenizer, len(tokens), merges=False)

    def source_tensors(self) -> Iterator[tuple[str, str]]:
        for name in self.weights.names():
            short = name.removeprefix("bert.")
            if short.startswith(self.skipped):
                continue
            if short.endswith(".gamma"):  # old checkpoints name LayerNorm parameters gamma and beta
                short = short.removesuffix(".gamma") + ".weight"
            elif short.endswith(".beta"):
                short = short.removesuffix(".beta") + ".bias"
            yield name, self.gguf_name(short)


def _pooling_type(source: Artifact) -> gguf.PoolingType | None:
    """The sentence-transformers pooling of ``modules.json``, as llama.cpp names it."""
    modules_path = source.path / "modules.json"
    if not modules_path.is_file():
        return None
    for module in _read_json(source, modules_path):
        if str(module.get("type", "")).endswith("Pooling"):
            config = _read_json(source, source.path / module.get("path", "") / "config.json")
            if config.get("pooling_mode_mean_tokens"):
                return gguf.PoolingType.MEAN
            if config.get("pooling_mode_cls_token"):
                return gguf.PoolingType.CLS
            if config.get("pooling_mode_lasttoken"):
                return gguf.PoolingType.LAST
    return None


# -- vocabularies ---------------------------------------------------------------------

#: Pre-tokenizer regexes of tokenizer.json ``Split`` steps, and llama.cpp's names for them.
SPLIT_PRETOKENIZERS = {
    # Llama 3 (and 3.1, 3.2): llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def _bpe_pre(converter: _Converter, tokenizer_json: dict[str, Any], clean_spaces: bool) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for how the tokenizer splits text before BPE.

    convert_hf_to_gguf recognises a pre-tokenizer by hashing the token ids of a test
    string, which only knows published vocabularies; here it is read from the
    tokenizer.json's own structure, which also covers derived and test tokenizers.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        # StarCoder's and SmolLM's: digits one by one, then GPT-2's regex; SmolLM keeps spaces as decoded.
        return "starcoder" if clean_spaces else "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PRETOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex", ""))
        if name:
            return name
    # llmk tokenizes with the Hugging Face files, never with llama.cpp's tokenizer, so the model
    # still serves exactly; only another program tokenizing with this file would split differently.
    log.warning("llamacpp.convert_unknown_pretokenizer", source=converter.source.source, pre_tokenizer=kinds)
    return "default"


def _hf_tokens(converter: _Converter) -> tuple[list[str], list[int], Any]:
    """Every id's token text and llama.cpp token type, as convert_hf_to_gguf's ``get_vocab_base``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converter.directory))
    vocab = tokenizer.get_vocab()
    size = int(converter.config.get("vocab_size") or len(vocab))
    if max(vocab.values()) >= size:
        raise SourceError(converter.source.source, f"the tokenizer has ids up to {max(vocab.values())}, "
                          f"more than the model's {size} embeddings")
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(size):
        token = reverse.get(index)
        if token is None:  # embedding rows no token uses
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if index in added:
            special = added[index].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, tokenizer


def _write_bpe_vocab(converter: _Converter, tokenizer_json: dict[str, Any]) -> None:
    """A byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``): tokens, merges, pre-tokenizer."""
    tokens, types, tokenizer = _hf_tokens(converter)
    writer = converter.writer
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_bpe_pre(converter, tokenizer_json,
                                      bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _write_special_tokens(converter, tokenizer, len(tokens), merges=True)


def _write_spm_vocab(converter: _Converter, tokenizer_json: dict[str, Any]) -> None:
    """A SentencePiece-style BPE with byte fallback, as Llama 2 and TinyLlama ship it in tokenizer.json
    (``tokenizer.ggml.model = "llama"``).

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the highest
    score; the scores written are minus each token's merge rank, so it merges in the order
    the Hugging Face tokenizer does (convert's ``LlamaHfVocab`` writes -1000 for every token).
    """
    tokens, types, tokenizer = _hf_tokens(converter)
    model = tokenizer_json["model"]
    merges = model.get("merges") or []
    ids = tokenizer.get_vocab()
    scores = [-float(len(merges) + 1)] * len(tokens)
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        index = ids.get(left + right)
        if index is not None and scores[index] == -float(len(merges) + 1):
            scores[index] = -float(rank)
    unk = ids.get(model.get("unk_token") or "")
    for index, token in enumerate(tokens):
        if types[index] == gguf.TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[index] = gguf.TokenType.BYTE
        if types[index] != gguf.TokenType.NORMAL:
            scores[index] = 0.0
    if unk is not None:
        types[unk] = gguf.TokenType.UNKNOWN
    if "<0x0A>" not in ids:
        raise UnsupportedError(f"llamacpp needs the byte token <0x0A> in a byte-fallback vocabulary; "
                               f"{converter.source.source} has none")
    writer = converter.writer
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_prepends_space(tokenizer_json))
    _write_special_tokens(converter, tokenizer, len(tokens), merges=False)


def _prepends_space(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (older files in the normalizer, newer in a Metaspace)."""
    def steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        part = part or {}
        return part.get(key, []) if part.get("type") == "Sequence" else [part]

    for step in steps(tokenizer_json.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return False


def _write_special_tokens(converter: _Converter, tokenizer: Any, n_vocab: int, *, merges: bool) -> None:
    """Special ids, merges and the chat template through gguf's ``SpecialVocab``, with whether
    to add bos/eos decided by what the tokenizer really does to a text."""
    # Only the kinds this gguf can write (it has no field for BERT's cls, which is its bos anyway).
    kinds = [kind for kind in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
             if hasattr(converter.writer, f"add_{kind}_token_id")]
    special = gguf.SpecialVocab(converter.directory, load_merges=merges, special_token_types=kinds, n_vocab=n_vocab)
    if merges and not special.merges:
        raise SourceError(converter.source.source, "its byte-level BPE tokenizer.json has no merges")
    ids = tokenizer("a")["input_ids"]
    for kind, position in (("bos", 0), ("eos", -1)):
        token = special.special_token_ids.get(kind)
        special.add_special_token[kind] = bool(ids) and token is not None and ids[position] == token
    special.add_to_gguf(converter.writer, quiet=True)


#: Hugging Face architectures this module converts, and how.
CONVERTERS: dict[str, type[_Converter]] = {
    "LlamaForCausalLM": _Llama,
    "BertModel": _Bert,
}
