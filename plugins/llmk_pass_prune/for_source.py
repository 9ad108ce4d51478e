"""prune on a Hugging Face directory (safetensors + config.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import llmk
from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk_pass_prune.optimizer import PruneOptions

MLP = re.compile(r"^(?P<prefix>.*\.mlp)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")
CHANNEL_MULTIPLE = 32  # keeps the pruned width usable by group-wise quantization
CALIBRATION_TEXT = Path(llmk.__file__).parent / "data" / "calibration.txt"


def prune(artifact: Artifact, out_dir: Path, options: PruneOptions) -> None:
    import torch
    from llmk_backend_torch.checkpoint import read_state, write_checkpoint

    config = json.loads((artifact.path / "config.json").read_text())
    if "llmk_quantization" in config:
        raise UnsupportedError("prune: prune before quantize (this model is already quantized)")
    state = read_state(artifact.path)
    if options.method == "magnitude":
        for name, weight in state.items():
            if name.endswith("proj.weight") and weight.ndim == 2:
                magnitudes = weight.abs().float().flatten()
                cut = magnitudes.kthvalue(max(1, int(magnitudes.numel() * options.sparsity))).values
                state[name] = torch.where(weight.abs() <= cut, torch.zeros_like(weight), weight)
    else:
        config["intermediate_size"] = _prune_mlp_channels(artifact, state, config, options.sparsity)
    write_checkpoint(artifact.path, out_dir, state, config)


def _prune_mlp_channels(artifact: Artifact, state: dict, config: dict, sparsity: float) -> int:
    """Keep, in every layer, the channels that carry the most signal: mean |activation|
    entering ``down_proj`` on a calibration text, times the norm of the channel's
    ``down_proj`` column. (Weight norms alone are a poor guide: on SmolLM2, dropping the
    3% smallest-norm channels multiplies perplexity by 100; this score costs +6%.)"""
    import torch

    blocks: dict[str, dict[str, str]] = {}
    for name in state:
        match = MLP.match(name)
        if match:
            blocks.setdefault(match["prefix"], {})[match["part"]] = name
    width = config.get("intermediate_size")
    if not blocks or not width or any(len(parts) != 3 for parts in blocks.values()):
        raise UnsupportedError("prune: mlp-channels needs a llama-style MLP (gate_proj, up_proj, down_proj)")
    keep = max(CHANNEL_MULTIPLE, int(round(width * (1 - sparsity) / CHANNEL_MULTIPLE)) * CHANNEL_MULTIPLE)
    if keep >= width:
        raise UnsupportedError(f"prune: sparsity {sparsity} removes no channel of {width} (kept in steps of 32)")
    activations = _mean_mlp_activations(artifact, list(blocks))
    for prefix, parts in blocks.items():
        gate, up, down = (state[parts[p]] for p in ("gate_proj", "up_proj", "down_proj"))
        score = activations[prefix] * down.float().norm(dim=0)
        kept = torch.topk(score, keep).indices.sort().values
        state[parts["gate_proj"]], state[parts["up_proj"]] = gate[kept], up[kept]
        state[parts["down_proj"]] = down[:, kept]
    return keep


def _mean_mlp_activations(artifact: Artifact, prefixes: list[str]) -> dict:
    """Mean |input of down_proj| per channel, over llmk's calibration text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmk.sources import load_hf_model

    model = load_hf_model(AutoModelForCausalLM, artifact.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(artifact.tokenizer_dir))
    ids = tokenizer(CALIBRATION_TEXT.read_text(), return_tensors="pt").input_ids[:, :1024]
    found: dict = {}

    def recorder(prefix: str):  # noqa: ANN202 - a forward pre-hook
        def hook(module, inputs):  # noqa: ANN001, ANN202
            found[prefix] = inputs[0].abs().reshape(-1, inputs[0].shape[-1]).mean(dim=0)
        return hook

    hooks = [model.get_submodule(f"{prefix}.down_proj").register_forward_pre_hook(recorder(prefix))
             for prefix in prefixes]
    with torch.inference_mode():
        model(ids)
    for hook in hooks:
        hook.remove()
    return found
