"""lora on a Hugging Face directory: peft loads the adapter onto the model and merges it."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmk.artifact import Artifact
from llmk.errors import SourceError


def merge(artifact: Artifact, adapter: Path, out_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmk.sources import load_hf_model

    if not (adapter / "adapter_config.json").is_file():
        raise SourceError(str(adapter), "not a LoRA adapter directory (no adapter_config.json)")
    model = load_hf_model(AutoModelForCausalLM, artifact.path, dtype=torch.float32)
    try:
        adapted = PeftModel.from_pretrained(model, adapter)
    except (ValueError, RuntimeError, KeyError) as error:  # another model's adapter: shapes or modules differ
        raise SourceError(str(adapter), f"this adapter does not fit {artifact.source}: {error}") from None
    adapted.merge_and_unload().save_pretrained(out_dir)
    for file in artifact.path.iterdir():  # the tokenizer and generation files, as they are
        if file.is_file() and file.suffix != ".safetensors" and not (out_dir / file.name).exists() \
                and file.name not in ("llmk-manifest.json", "model.safetensors.index.json"):
            shutil.copy(file, out_dir / file.name)
