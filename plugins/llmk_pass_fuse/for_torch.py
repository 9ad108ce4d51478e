"""fuse for the torch backend: the checkpoint format of ``llmk_backend_torch.fused``."""

from __future__ import annotations

import json
from pathlib import Path

from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk_pass_fuse.optimizer import FuseOptions


def fuse(artifact: Artifact, out_dir: Path, options: FuseOptions) -> None:
    import torch
    from llmk_backend_torch.checkpoint import read_state, write_checkpoint
    from llmk_backend_torch.fused import CONFIG_KEY, GROUPS
    from llmk_backend_torch.quantized import CONFIG_KEY as QUANTIZATION_KEY

    config = json.loads((artifact.path / "config.json").read_text())
    if CONFIG_KEY in config:
        raise UnsupportedError("fuse: this model is already fused")
    state = read_state(artifact.path)
    enabled = {option: getattr(options, option) for option in GROUPS}
    renamed: dict[str, str] = {}  # replaced projection -> fused projection
    for option, (fused_name, names) in GROUPS.items():
        if not enabled[option]:
            continue
        first = names[0]
        parents = {k.rsplit(".", 2)[0] for k in state if k.rsplit(".", 2)[-2:-1] == [first]}
        for parent in sorted(parents):
            tensors = [k.removeprefix(f"{parent}.{first}.") for k in list(state) if k.startswith(f"{parent}.{first}.")]
            for tensor in tensors:  # weight, bias, or a quantized projection's qweight/scales/zeros
                parts = [state.pop(f"{parent}.{name}.{tensor}") for name in names]
                state[f"{parent}.{fused_name}.{tensor}"] = torch.cat(parts, dim=0)
            renamed.update({f"{parent}.{name}": f"{parent}.{fused_name}" for name in names})
    if not renamed:
        architecture = ", ".join(config.get("architectures", [])) or "unknown architecture"
        raise UnsupportedError(f"fuse: nothing to fuse in this model ({architecture}); "
                               "it fuses q/k/v_proj and gate/up_proj")
    if QUANTIZATION_KEY in config:  # the quantized modules are now the fused ones
        modules = config[QUANTIZATION_KEY]["modules"]
        config[QUANTIZATION_KEY]["modules"] = sorted({renamed.get(m, m) for m in modules})
    config[CONFIG_KEY] = enabled
    write_checkpoint(artifact.path, out_dir, state, config)
