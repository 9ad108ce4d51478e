"""Graph capture of Hugging Face models for the runtimes that need a graph.

The ONNX Runtime and OpenVINO backends export through these wrappers, so both
see the same signature: a decoder takes ``input_ids``, ``attention_mask``,
``position_ids`` and the past keys/values as plain tensors (``past.N.key``,
``past.N.value``, shape ``[batch, kv_heads, past, head_dim]``) and returns
``logits`` and the updated ``present.N.key``/``present.N.value``; an encoder
takes ``input_ids`` and ``attention_mask`` and returns ``last_hidden_state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmk_backend_torch.backend import TORCH_DTYPES


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVLayout:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    @property
    def past_names(self) -> list[str]:
        return [f"past.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]


class DecoderWithPast(torch.nn.Module):
    """A causal LM with its KV cache as explicit inputs and outputs."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.layout = KVLayout.of(model.config)

    def forward(self, input_ids, attention_mask, position_ids, past):  # noqa: ANN001 - traced
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for index, layer in enumerate(cache.layers):
            # Set the tensors directly: update() would concatenate onto an empty
            # 1-D tensor, which some graph frontends (OpenVINO's) cannot convert.
            layer.lazy_initialization(past[2 * index], past[2 * index + 1])
            layer.keys, layer.values = past[2 * index], past[2 * index + 1]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class Encoder(torch.nn.Module):
    """An encoder returning its last hidden states."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # noqa: ANN001 - traced
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_for_export(path: Path, task: str, dtype: str) -> torch.nn.Module:
    """The model at ``path``, in ``dtype``, wrapped for graph capture."""
    from transformers import AutoModel, AutoModelForCausalLM

    from llmk.sources import load_hf_model

    auto = AutoModelForCausalLM if task == "generate" else AutoModel
    model = load_hf_model(auto, path, dtype=getattr(torch, TORCH_DTYPES[dtype]), attn_implementation="sdpa")
    model.eval()
    return DecoderWithPast(model) if task == "generate" else Encoder(model)


def example_inputs(wrapper: torch.nn.Module) -> dict[str, Any]:
    """Inputs with every dynamic dimension > 1, so none is specialized away."""
    batch, seq, past = 2, 3, 4
    ids = torch.ones((batch, seq), dtype=torch.long)
    if isinstance(wrapper, Encoder):
        return {"input_ids": ids, "attention_mask": torch.ones((batch, seq), dtype=torch.long)}
    layout = wrapper.layout
    dtype = next(wrapper.parameters()).dtype
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    mask[0, 0] = 0  # a padded row, so that tracing keeps the masking path
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.arange(past, past + seq).expand(batch, seq),
        "past": [torch.zeros((batch, layout.kv_heads, past, layout.head_dim), dtype=dtype)
                 for _ in range(2 * layout.layers)],
    }


def dynamic_shapes(wrapper: torch.nn.Module) -> dict[str, Any]:
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    if isinstance(wrapper, Encoder):
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    past = Dim("past")
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past} for _ in range(2 * wrapper.layout.layers)],
    }


def io_names(wrapper: torch.nn.Module) -> tuple[list[str], list[str]]:
    if isinstance(wrapper, Encoder):
        return ["input_ids", "attention_mask"], ["last_hidden_state"]
    layout = wrapper.layout
    return ["input_ids", "attention_mask", "position_ids", *layout.past_names], ["logits", *layout.present_names]
