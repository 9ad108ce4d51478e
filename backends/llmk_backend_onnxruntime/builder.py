"""The decoder graph, built directly with ``onnx.helper`` from a Hugging Face
directory (``config.json`` and safetensors weights), for the step contract.

One graph serves prompt chunks, batched decode and draft verification:

- inputs: ``input_ids [batch, sequence]``; per row ``seqlens_k`` (tokens in the
  row's cache after this step, minus one) and ``query_seqlens`` (valid tokens in
  the right-padded row; 0 for an idle row); ``total_sequence_length`` (an upper
  bound of the cache length); ``logits_rows`` (flattened ``batch * sequence``
  positions whose logits are wanted); ``past_key_values.{i}.key/.value``
  ``[batch, kv_heads, capacity, head_dim]``;
- outputs: ``logits [rows, vocab]`` (float32) and ``present.{i}.key/.value``,
  which the runner binds to the very buffers of the pasts: ``GroupQueryAttention``
  then appends the new keys and values in place.

Per layer: ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm), one
Q/K/V ``MatMul``, ``GroupQueryAttention`` on the packed Q/K/V with rotary
embedding inside (fp32 cos/sin tables from the config's rope parameters), the
output ``MatMul``, then one gate/up ``MatMul`` and SiLU. Activations are 2-D,
``[batch * sequence, features]``, except around the attention op. Only the rows in
``logits_rows`` go through the final norm and the output head, so a prompt
chunk does not compute ``chunk × vocab`` logits it throws away. Weights are 2-D
``[K, N]`` initializers feeding ``MatMul`` directly and the embedding is a
``Gather`` on ``input_ids``, the shapes the ``quantize`` pass rewrites.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmk.errors import SourceError, UnsupportedError

#: Architectures this builder writes, and what their checkpoints may add: biases
#: on the Q/K/V projections (Qwen2) are read whenever the checkpoint has them.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
#: Rope types whose tables do not depend on the sequence length, so that one
#: precomputed cos/sin table is exact at every position.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
MS_DOMAIN = "com.microsoft"
OPSET = 21
IR_VERSION = 10
#: Initializers at least this large go to the external data file, each at an aligned offset.
EXTERNAL_MIN_BYTES = 1024
ALIGNMENT = 4096

ONNX_DTYPES = {"fp32": 1, "fp16": 10, "bf16": 16}  # TensorProto.FLOAT, FLOAT16, BFLOAT16


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@dataclass(frozen=True)
class DecoderConfig:
    """What the graph needs from ``config.json``."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_context: int
    tied: bool

    @classmethod
    def read(cls, path: Path) -> DecoderConfig:
        """Refuses, naming the reason, what the graph cannot express."""
        config = json.loads((path / "config.json").read_text())
        architecture = next(iter(config.get("architectures") or []), config.get("model_type", "unknown"))
        if architecture not in ARCHITECTURES:
            raise UnsupportedError(f"onnxruntime cannot build a graph for {architecture}; "
                                   f"it supports {', '.join(ARCHITECTURES)}")
        max_context = int(config.get("max_position_embeddings") or 2048)
        window = config.get("sliding_window")
        sliding = "sliding_attention" in (config.get("layer_types") or [])
        if architecture == "Qwen2ForCausalLM":
            sliding = sliding or bool(config.get("use_sliding_window"))
        elif architecture == "MistralForCausalLM":
            sliding = sliding or (window is not None and window < max_context)
        if sliding:
            raise UnsupportedError(f"onnxruntime: {architecture} with sliding-window attention is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedError(f"onnxruntime: {architecture} with hidden_act={config['hidden_act']!r} "
                                   "is not supported (silu only)")
        heads = int(config["num_attention_heads"])
        return cls(
            architecture=architecture,
            layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            vocab=int(config["vocab_size"]),
            eps=float(config.get("rms_norm_eps", 1e-6)),
            max_context=max_context,
            tied=bool(config.get("tie_word_embeddings", False)),
        )


# -- weights ---------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class Checkpoint:
    """The tensors of a directory's ``*.safetensors`` files, memory-mapped and read
    as float32. (``safetensors.numpy`` cannot read bfloat16, which NumPy lacks; the
    format is a JSON header and raw little-endian data, so it is read directly.)"""

    def __init__(self, path: Path):
        self.path = path
        #: name -> (file, offset of the data, dtype, shape, begin, end)
        self.tensors: dict[str, tuple[Path, int, str, list[int], int, int]] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SourceError(str(path), "no *.safetensors weights")
        for file in files:
            with file.open("rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    self.tensors[name] = (file, 8 + size, info["dtype"], info["shape"], begin, end)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise SourceError(str(self.path), f"the weights have no tensor {name!r}")
        file, base, kind, shape, begin, _ = self.tensors[name]
        if kind not in _SAFETENSORS_DTYPES:
            raise SourceError(str(file), f"tensor {name!r} has dtype {kind}; expected a float type")
        raw = np.memmap(file, dtype=_SAFETENSORS_DTYPES[kind], mode="r", offset=base + begin,
                        shape=(math.prod(shape),) if shape else ())
        if kind == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return np.asarray(raw, dtype=np.float32).reshape(shape)


def encode(array: np.ndarray, dtype: str) -> bytes:
    """``array`` (float) as the raw little-endian bytes of ``dtype``."""
    if dtype == "fp32":
        return np.ascontiguousarray(array, dtype=np.float32).tobytes()
    if dtype == "fp16":
        return np.ascontiguousarray(array, dtype=np.float16).tobytes()
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()  # round to nearest even


class _DataFile:
    """Writes large initializers into ``<model>.data`` as they are made, so the whole
    model is never held in memory twice."""

    def __init__(self, model_path: Path):
        self.name = model_path.name + ".data"
        self.file = (model_path.parent / self.name).open("wb")

    def tensor(self, name: str, raw: bytes, data_type: int, dims: list[int]) -> Any:
        from onnx import TensorProto

        tensor = TensorProto(name=name, data_type=data_type, dims=dims)
        if len(raw) < EXTERNAL_MIN_BYTES:
            tensor.raw_data = raw
            return tensor
        offset = -(-self.file.tell() // ALIGNMENT) * ALIGNMENT
        self.file.seek(offset)
        self.file.write(raw)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.file.close()


# -- rotary tables -----------------------------------------------------------------

def rotary_tables(path: Path, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin) [length, head_dim / 2]`` in float32, computed by transformers'
    own rotary embedding for this config (rope type, scaling and attention factor)."""
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(str(path))
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedError(f"onnxruntime: rope type {rope_type!r} depends on the sequence length; "
                               f"supported: {', '.join(sorted(STATIC_ROPE_TYPES))}")
    # The Llama, Mistral and Qwen2 rotary embeddings are the same code on their configs.
    rotary = LlamaRotaryEmbedding(config)
    with torch.no_grad():
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(probe, torch.arange(length, dtype=torch.long)[None])
    half = head_dim // 2
    return cos[0, :, :half].numpy().astype(np.float32), sin[0, :, :half].numpy().astype(np.float32)


# -- the graph ----------------------------------------------------------------------

class _Graph:
    """Nodes and initializers, with generated names."""

    def __init__(self, data: _DataFile, dtype: str):
        self.data, self.dtype = data, dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float initializer, in the model's dtype."""
        raw = encode(array, self.dtype)
        self.initializers.append(self.data.tensor(name, raw, ONNX_DTYPES[self.dtype], list(array.shape)))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int | list[str | None] = 1, domain: str = "",
             scope: str = "", **attrs: Any) -> list[str]:
        """Add a node; ``outputs`` is a count or names, ``None`` for a generated one
        and ``""`` for an optional output that is not computed. ``scope`` prefixes its
        name (profiles group by it)."""
        from onnx import helper

        self.count += 1
        name = f"/{scope}/{op}_{self.count}" if scope else f"/{op}_{self.count}"
        wanted = [None] * outputs if isinstance(outputs, int) else outputs
        names = [f"{name}/out{i}" if n is None else n for i, n in enumerate(wanted)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain or None, **attrs))
        return names

    def one(self, op: str, inputs: list[str], domain: str = "", scope: str = "", **attrs: Any) -> str:
        return self.node(op, inputs, 1, domain, scope, **attrs)[0]


class _Decoder:
    """Writes the nodes of one decoder, layer by layer, into a ``_Graph``."""

    def __init__(self, graph: _Graph, weights: Checkpoint, config: DecoderConfig, cos: str, sin: str):
        self.graph, self.weights, self.config = graph, weights, config
        self.rotary = (cos, sin)
        # Activations are 2-D, [batch * sequence, features], except around the attention op.
        self.flat = graph.constant("flat_shape", np.array([-1, config.hidden], np.int64))
        self.flat_attention = graph.constant("flat_attention_shape",
                                             np.array([-1, config.heads * config.head_dim], np.int64))
        self.batched = graph.one("Concat", [graph.one("Shape", ["input_ids"]),
                                            graph.constant("last_axis", np.array([-1], np.int64))], axis=0)

    def norm_weight(self, name: str) -> str:
        return self.graph.weight(name, self.weights.get(name))

    def rms_norm(self, x: str, weight: str) -> str:
        return self.graph.one("SimplifiedLayerNormalization", [x, self.norm_weight(weight)], axis=-1,
                              epsilon=self.config.eps, stash_type=1)

    def add_rms_norm(self, x: str, residual: str, weight: str) -> tuple[str, str]:
        """``(norm(x + residual), x + residual)``."""
        normed, _, _, total = self.graph.node("SkipSimplifiedLayerNormalization",
                                              [x, residual, self.norm_weight(weight)], [None, "", "", None],
                                              MS_DOMAIN, epsilon=self.config.eps)
        return normed, total

    def linear(self, x: str, prefix: str, names: list[str], fused: str) -> str:
        """``x @ W`` for the projections ``names`` stacked along N (one ``MatMul`` on a
        ``[K, N]`` weight), plus their biases when the checkpoint has them."""
        matrix = np.concatenate([self.weights.get(f"{prefix}.{n}.weight") for n in names], axis=0).T
        out = self.graph.one("MatMul", [x, self.graph.weight(f"{prefix}.{fused}.weight", matrix)],
                             scope=f"{prefix}.{fused}")
        if all(f"{prefix}.{n}.bias" in self.weights for n in names):
            bias = np.concatenate([self.weights.get(f"{prefix}.{n}.bias") for n in names])
            out = self.graph.one("Add", [out, self.graph.weight(f"{prefix}.{fused}.bias", bias)])
        return out

    def attention(self, x: str, layer: int) -> str:
        prefix, graph = f"model.layers.{layer}.self_attn", self.graph
        qkv = graph.one("Reshape", [self.linear(x, prefix, ["q_proj", "k_proj", "v_proj"], "qkv_proj"), self.batched])
        past, present = past_names(self.config.layers)[2 * layer:], present_names(self.config.layers)[2 * layer:]
        inputs = [qkv, "", "", past[0], past[1], "seqlens_k", "total_sequence_length", *self.rotary,
                  "", "", "", "", "", "", "", "query_seqlens"]
        out = graph.node("GroupQueryAttention", inputs, [None, present[0], present[1]], MS_DOMAIN,
                         num_heads=self.config.heads, kv_num_heads=self.config.kv_heads, do_rotary=1)[0]
        return self.linear(graph.one("Reshape", [out, self.flat_attention]), prefix, ["o_proj"], "o_proj")

    def mlp(self, x: str, layer: int) -> str:
        prefix, graph = f"model.layers.{layer}.mlp", self.graph
        gate, up = graph.node("Split", [self.linear(x, prefix, ["gate_proj", "up_proj"], "gate_up_proj")], 2,
                              axis=-1, num_outputs=2)
        activated = graph.one("Mul", [graph.one("Mul", [gate, graph.one("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        return self.linear(activated, prefix, ["down_proj"], "down_proj")

    def build(self) -> None:
        graph, config = self.graph, self.config
        table = self.weights.get("model.embed_tokens.weight")
        embedded = graph.one("Gather", [graph.weight("model.embed_tokens.weight", table), "input_ids"])
        residual = graph.one("Reshape", [embedded, self.flat])
        x = self.rms_norm(residual, "model.layers.0.input_layernorm.weight")
        for layer in range(config.layers):
            x, residual = self.add_rms_norm(self.attention(x, layer), residual,
                                            f"model.layers.{layer}.post_attention_layernorm.weight")
            out = self.mlp(x, layer)
            if layer + 1 < config.layers:
                x, residual = self.add_rms_norm(out, residual, f"model.layers.{layer + 1}.input_layernorm.weight")
        hidden = graph.one("Add", [out, residual])
        # Only the wanted rows go through the final norm and the head.
        normed = self.rms_norm(graph.one("Gather", [hidden, "logits_rows"], axis=0), "model.norm.weight")
        # A head of its own even when tied (the table's transpose): MatMul wants [K, N],
        # and the quantize pass stores the two in one 8-bit table again.
        head = table if config.tied or "lm_head.weight" not in self.weights else self.weights.get("lm_head.weight")
        head_name = graph.weight("lm_head.weight", np.ascontiguousarray(head.T))
        if graph.dtype == "fp32":
            graph.node("MatMul", [normed, head_name], ["logits"], scope="lm_head")
        else:
            logits = graph.one("MatMul", [normed, head_name], scope="lm_head")
            graph.node("Cast", [logits], ["logits"], to=ONNX_DTYPES["fp32"])


def build_decoder(source: Path, model_path: Path, *, dtype: str) -> DecoderConfig:
    """Write the decoder graph of the Hugging Face directory ``source`` to ``model_path``
    (and its weights beside it, in ``<name>.data``); returns the config it read."""
    import onnx
    from onnx import TensorProto, helper

    if dtype not in ONNX_DTYPES:
        raise UnsupportedError(f"onnxruntime: dtype {dtype!r} is not supported; use {', '.join(ONNX_DTYPES)}")
    config = DecoderConfig.read(source)
    weights = Checkpoint(source)
    cos, sin = rotary_tables(source, config.head_dim, config.max_context)
    data = _DataFile(model_path)
    try:
        graph = _Graph(data, dtype)
        _Decoder(graph, weights, config, graph.weight("rotary.cos", cos), graph.weight("rotary.sin", sin)).build()
    finally:
        data.close()
    element = ONNX_DTYPES[dtype]
    kv_shape = ["batch", config.kv_heads, "capacity", config.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("logits_rows", TensorProto.INT64, ["rows"]),
        *[helper.make_tensor_value_info(name, element, kv_shape) for name in past_names(config.layers)],
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", config.vocab]),
        *[helper.make_tensor_value_info(name, element, kv_shape) for name in present_names(config.layers)],
    ]
    model = helper.make_model(
        helper.make_graph(graph.nodes, "llmk-decoder", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        ir_version=IR_VERSION, producer_name="llmk",
    )
    onnx.save_model(model, str(model_path))
    return config
