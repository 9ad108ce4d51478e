"""Weight-only quantized linear layers.

The format (written by the ``quantize`` pass, read here): ``config.json`` has
``"llmk_quantization": {"bits": 8|4, "group_size": G, "modules": [names]}``;
for each listed ``nn.Linear`` the safetensors hold ``NAME.qweight`` (int8
``[out, in]``, or for 4 bits uint8 ``[out, in/2]`` with two weights a byte),
``NAME.scales`` and ``NAME.zeros`` (float32 ``[out, in/G]``; G = 0 means one
group per row), such that
``weight = q * scale + zero`` group by group. A 4-bit group of 32 with a float
zero is the GGUF Q4_1 grid, so SmolLM2's weights round-trip exactly.
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
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float32))
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.compute_dtype = dtype

    def weight_matrix(self) -> torch.Tensor:
        q = self.qweight
        if self.bits == 4:
            q = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(self.out_features, self.in_features)
        grouped = q.to(torch.float32).reshape(self.out_features, -1, self.group_size)
        weight = grouped * self.scales[..., None] + self.zeros[..., None]
        return weight.reshape(self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_matrix(), self.bias)


def quantize_modules(model: torch.nn.Module, spec: dict[str, Any], dtype: torch.dtype) -> None:
    """Replace the listed ``nn.Linear`` modules with empty quantized ones (the
    checkpoint's tensors are loaded into them next)."""
    for name in spec["modules"]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, QuantizedLinear(linear.in_features, linear.out_features, spec["bits"],
                                               spec["group_size"], linear.bias is not None, dtype))
