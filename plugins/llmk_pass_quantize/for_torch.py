"""quantize for the torch backend: the checkpoint format of ``llmk_backend_torch.quantized``."""

from __future__ import annotations

import json
from pathlib import Path

from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk_pass_quantize.optimizer import QuantizeOptions


def quantize(artifact: Artifact, out_dir: Path, options: QuantizeOptions) -> None:
    import torch
    from llmk_backend_torch.checkpoint import read_state, write_checkpoint
    from llmk_backend_torch.quantized import CONFIG_KEY

    from llmk_pass_quantize.grids import symmetric_int8

    if options.activations:
        raise UnsupportedError("quantize: activations=true is available on onnxruntime only")
    config = json.loads((artifact.path / "config.json").read_text())
    if CONFIG_KEY in config:
        raise UnsupportedError("quantize: this model is already quantized")
    state = read_state(artifact.path)
    group = options.group_size if options.bits == 4 else None
    out: dict[str, torch.Tensor] = {}
    modules = []
    # A tied embedding table (the head reuses it; 28% of SmolLM2) goes to int8 with one
    # scale per row: the layout of PyTorch's int8 weight-only matmul, which serves the head.
    embedding = next((n for n in state if n.endswith("embed_tokens.weight")), None)
    tied = embedding is not None and config.get("tie_word_embeddings", False) and not any(
        n.startswith("lm_head.") for n in state)
    if tied:
        table = state.pop(embedding).float().numpy()
        q, scales = symmetric_int8(table, table.shape[1])
        module = embedding.removesuffix(".weight")
        out[f"{module}.qweight"], out[f"{module}.scales"] = torch.from_numpy(q), torch.from_numpy(scales[:, 0])
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if _is_linear_weight(name, tensor) and (group is None or tensor.shape[1] % group == 0):
            qweight, scales, zeros = _quantize(tensor.float(), options.bits, group or tensor.shape[1])
            out[f"{module}.qweight"], out[f"{module}.scales"], out[f"{module}.zeros"] = qweight, scales, zeros
            modules.append(module)
        else:
            out[name] = tensor
    # group_size 0: one scale per output row (int8)
    config[CONFIG_KEY] = {"bits": options.bits, "group_size": group or 0, "modules": sorted(modules),
                          "embedding": tied}
    write_checkpoint(artifact.path, out_dir, out, config)


def _is_linear_weight(name: str, tensor) -> bool:  # noqa: ANN001 - torch.Tensor
    """Projection matrices inside the transformer blocks (not embeddings or norms)."""
    return name.endswith("proj.weight") and tensor.ndim == 2 and tensor.is_floating_point()


def _quantize(weight, bits: int, group: int):  # noqa: ANN001, ANN202 - torch tensors
    """The checkpoint tensors of one projection: ``(qweight, scales, zeros)``."""
    import torch

    from llmk_pass_quantize.grids import asymmetric_uint4, pack_uint4, symmetric_int8

    array = weight.numpy()
    if bits == 8:  # symmetric: zero is exactly representable
        q, scales = symmetric_int8(array, group)
        return torch.from_numpy(q), torch.from_numpy(scales), torch.zeros(scales.shape)
    q, scales, minimums = asymmetric_uint4(array, group)
    return (torch.from_numpy(pack_uint4(q)), torch.from_numpy(scales).half(),  # fp16, as GGUF stores them
            torch.from_numpy(minimums).half())
