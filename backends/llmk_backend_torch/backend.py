"""PyTorch backend: Hugging Face transformers models in eager PyTorch."""

from __future__ import annotations

import json
import math
from typing import ClassVar, Literal

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions, Runner
from llmk.cache import Cache
from llmk.errors import SourceError

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

#: Bump when the graphs ``export.py`` traces change: it is part of every export's cache key.
EXPORT_VERSION = "2"


def export_versions() -> dict[str, str]:
    """What an exported graph depends on besides the target runtime: the tracer and
    ``export.py``. Read from the package metadata: a cached load must not pay for
    importing torch (1.5 s) just to name its cache entry."""
    from importlib.metadata import version

    return {"torch": version("torch"), "llmk-export": EXPORT_VERSION}
_INT_SIZES = {"I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


class TorchOptions(BackendOptions):
    #: Attention kernel of encoders; "eager" is the reference, "sdpa" PyTorch's fused one.
    #: Decoders always run llmk's paged attention (SDPA over the KV cache's blocks).
    attention: Literal["sdpa", "eager"] = "sdpa"
    #: Intra-op CPU threads; 0 keeps PyTorch's default (one per core).
    threads: int = 0


class TorchBackend(Backend):
    name = "torch"
    requires = ("torch", "transformers")
    install = "pip install torch==2.13.0 transformers"
    # 1.1x the tensors in fp32 (measured on SmolLM2: 1.09x).
    memory_factor: ClassVar[float] = 1.2
    # Quantized checkpoints expand each layer's weights per call (measured: 1.7x).
    quantized_memory_factor: ClassVar[float] = 1.9
    speed_rank: ClassVar[dict[str, int]] = {"cpu": 10, "cuda": 100}
    Options = TorchOptions

    @classmethod
    def devices(cls) -> list[str]:
        import torch

        cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        return [*cuda, "cpu"]

    def estimate_memory(self, artifact: Artifact, *, device: str, dtype: str, options: BackendOptions) -> int:
        """Tensor sizes from the safetensors headers (float tensors at the target dtype), times the factor."""
        from safetensors import safe_open

        itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
        total = 0
        for file in artifact.path.glob("*.safetensors"):
            with safe_open(str(file), framework="numpy") as weights:
                for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                    info = weights.get_slice(name)
                    count = math.prod(info.get_shape())
                    kind = info.get_dtype()
                    total += count * (itemsize if kind.startswith(("F", "BF")) else _INT_SIZES.get(kind, 1))
        from llmk_backend_torch.quantized import CONFIG_KEY

        quantized = CONFIG_KEY in json.loads((artifact.path / "config.json").read_text())
        factor = self.quantized_memory_factor if quantized else self.memory_factor
        return int(total * factor)

    def load(self, artifact: Artifact, *, device: str, dtype: str, options: TorchOptions, cache: Cache) -> Runner:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from llmk.sources import load_hf_model
        from llmk_backend_torch.checkpoint import is_custom, load_custom
        from llmk_backend_torch.runner import ATTENTION, TorchRunner, register_attention

        if options.threads:
            torch.set_num_threads(options.threads)
        generate = artifact.task == "generate"
        auto = AutoModelForCausalLM if generate else AutoModel
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        if generate:
            register_attention()
        attention = ATTENTION if generate else options.attention
        try:
            if is_custom(artifact.path):
                model = load_custom(artifact.path, auto, torch_dtype, attention)
            else:
                model = load_hf_model(auto, artifact.path, dtype=torch_dtype, attn_implementation=attention)
        except (OSError, ValueError, RuntimeError) as error:
            raise SourceError(artifact.source, f"cannot load weights from {artifact.path}: {error}") from error
        model.to(device).eval()
        return TorchRunner(model, artifact.task, device)
