"""The ``half`` pass: store a model's floating-point weights in fp16 or bf16.

It halves the size of the weights on disk. At load time the backend still
computes in the model's requested ``dtype`` (fp32 on a CPU by default), so the
outputs stay within rounding error of the original model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from llmk import Artifact, Optimizer, PassOptions

#: The file in which the kernel's cache lists an entry's files; never copied.
KERNEL_MANIFEST = "llmk-manifest.json"


class HalfOptions(PassOptions):
    """Options of ``half`` (``extra="forbid"`` comes from ``PassOptions``)."""

    #: Storage dtype of every floating-point tensor.
    dtype: Literal["fp16", "bf16"] = "fp16"


class HalfPass(Optimizer):
    name = "half"
    backends = frozenset({"torch"})
    # Checked by `llmk plugins` and before the pass runs, without importing them.
    requires = ("torch", "safetensors")
    install = "pip install llmk"
    Options = HalfOptions
    presets: ClassVar[dict[str, dict[str, Any]]] = {"fast": {"dtype": "bf16"}}

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: HalfOptions) -> None:
        """Write a new Hugging Face directory into ``out_dir``; ``artifact`` is only read.

        The kernel calls this inside an atomic cache build and caches the result
        (keyed by the input, this pass, its options and this package's version),
        so it runs once per model and option set.
        """
        import torch
        from safetensors.torch import load_file, save_file

        target = {"fp16": torch.float16, "bf16": torch.bfloat16}[options.dtype]
        source = Path(artifact.path)
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            if file.name == KERNEL_MANIFEST:
                continue  # the kernel's own record of a cache entry; it writes a fresh one for ours
            dest = out_dir / file.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if file.suffix == ".safetensors":
                tensors = load_file(file)
                cast = {k: (t.to(target) if t.is_floating_point() else t) for k, t in tensors.items()}
                save_file(cast, dest, metadata={"format": "pt"})
            else:
                # config.json, tokenizer files, modules.json, 1_Pooling/, ... unchanged.
                shutil.copy2(file, dest)
