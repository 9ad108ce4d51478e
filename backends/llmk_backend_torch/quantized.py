"""Weight-only quantized linear layers.

The format (written by the ``quantize`` pass, read here): ``config.json`` has
``"llmk_quantization": {"bits": 8|4, "group_size": G, "modules": [names]}``;
for each listed ``nn.Linear`` the safetensors hold ``NAME.qweight`` (int8
``[out, in]``, or for 4 bits uint8 ``[out, in/2]`` with two weights a byte),
``NAME.scales`` and ``NAME.zeros`` (``[out, in/G]``, float32 for 8 bits and
float16 for 4; G = 0 means one group per row), such that
``weight = q * scale + zero`` group by group. A 4-bit group of 32 with a float
zero is the GGUF Q4_1 grid, so SmolLM2's weights round-trip exactly.

With ``"embedding": true`` the tied embedding table is stored as
``EMBEDDING.qweight`` (int8 ``[vocab, hidden]``) and ``EMBEDDING.scales``
(float32 ``[vocab]``), and serves the output head too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CONFIG_KEY = "llmk_quantization"


class QuantizedLinear(torch.nn.Module):
    """``nn.Linear`` whose weight is stored in 8 or 4 bits and expanded per call."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype):
        super().__init__()
        group_size = group_size or in_features  # 0: one group per output row
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = in_features // group_size
        packed = in_features if bits == 8 else in_features // 2
        storage = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, packed, dtype=storage))
        # 4-bit groups keep their scale and zero in fp16, as GGUF does (exact on its grids).
        params = torch.float16 if bits == 4 else torch.float32
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=params))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=params))
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.compute_dtype = dtype

    def weight_matrix(self) -> torch.Tensor:
        q = self.qweight
        if self.bits == 4:
            q = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(self.out_features, self.in_features)
        grouped = q.to(torch.float32).reshape(self.out_features, -1, self.group_size)
        weight = grouped * self.scales[..., None].float() + self.zeros[..., None].float()
        return weight.reshape(self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_matrix(), self.bias)


class QuantizedEmbedding(torch.nn.Module):
    """The token embedding table in int8, one scale per row; looks up rows, then
    dequantizes only those."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.compute_dtype = num_embeddings, embedding_dim, dtype
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].to(torch.float32) * self.scales[ids][..., None]).to(self.compute_dtype)


class QuantizedHead(torch.nn.Module):
    """The output projection on an int8 table with one scale per row (the
    embedding's, when the head is tied to it), through PyTorch's int8
    weight-only matmul kernel."""

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        self.table = [embedding]  # a list keeps it out of the module tree: its tensors are saved once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (table,) = self.table
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
        logits = torch._weight_int8pack_mm(flat, table.qweight, table.scales)
        return logits.reshape(*x.shape[:-1], -1).to(x.dtype)


def quantize_modules(model: torch.nn.Module, spec: dict[str, Any], dtype: torch.dtype) -> None:
    """Replace the listed ``nn.Linear`` modules (and, with ``"embedding": true``,
    the tied embedding table and output head) with empty quantized ones; the
    checkpoint's tensors are loaded into them next."""
    if spec.get("embedding"):
        table = model.get_input_embeddings()
        quantized = QuantizedEmbedding(table.num_embeddings, table.embedding_dim, dtype)
        model.set_input_embeddings(quantized)
        model.set_output_embeddings(QuantizedHead(quantized))
    for name in spec["modules"]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, QuantizedLinear(linear.in_features, linear.out_features, spec["bits"],
                                               spec["group_size"], linear.bias is not None, dtype))
