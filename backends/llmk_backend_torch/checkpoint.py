"""Loading llmk's own checkpoint variants: a Hugging Face directory whose
``config.json`` says the projections are fused (``llmk_fusion``) and/or
quantized (``llmk_quantization``), which transformers cannot load by itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmk_backend_torch.fused import CONFIG_KEY as FUSION_KEY
from llmk_backend_torch.quantized import CONFIG_KEY as QUANTIZATION_KEY


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors files."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def write_checkpoint(source: Path, out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A Hugging Face directory in ``out_dir``: ``state`` and ``config``, plus the
    source's other files (tokenizer, generation config) as they are."""
    import shutil

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in ("config.json", "llmk-manifest.json"):
            shutil.copy(file, out_dir / file.name)


def is_custom(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text())
    return FUSION_KEY in config or QUANTIZATION_KEY in config


def load_custom(path: Path, auto: Any, dtype: torch.dtype, attention: str) -> torch.nn.Module:
    """Build the model from its config, swap in the fused/quantized modules, load the weights."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from llmk_backend_torch.fused import fuse_modules
    from llmk_backend_torch.quantized import quantize_modules

    config = AutoConfig.from_pretrained(str(path))
    with no_init_weights():
        model = auto.from_config(config, dtype=dtype, attn_implementation=attention)
        # Fusion first: a quantized checkpoint may list the fused projections.
        if fusion := getattr(config, FUSION_KEY, None):
            fuse_modules(model, fusion)
        if quantization := getattr(config, QUANTIZATION_KEY, None):
            quantize_modules(model, quantization, dtype)
    missing, unexpected = model.load_state_dict(read_state(path), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if not (quantization or {}).get("embedding"):  # a quantized head already reads the quantized table
        model.tie_weights()
    return model
