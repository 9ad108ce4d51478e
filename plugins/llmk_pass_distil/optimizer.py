"""Knowledge distillation on the Hugging Face source: the unoptimized model (the
teacher) trains the output of the source passes before it (the student), so that
``["prune:sparsity=0.25", "distil"]`` heals part of what pruning lost while keeping
its shapes, size and speed.

- Teacher: the source model as llmk resolved it, before any pass (``artifact.tokenizer_dir``,
  which always holds the original source's Hugging Face files, weights included). After
  ``lora`` it would train the adapter away: put distil right after the lossy passes.
- Student: the previous pass's output, trained whole but for the embedding table; its
  shapes stay as they are (a structured prune stays smaller) and every weight that is
  exactly zero stays zero (a magnitude prune keeps its mask: it is applied again after
  each optimizer step).
- Data: llmk's calibration text (the one ``prune`` scores channels on) plus ``samples``
  texts the teacher writes from its start token (its own distribution, so no dataset is
  needed; the calibration text alone, 287 tokens, overfits). Never the quality gate's
  text (``llmk/data/wiki.txt``), which stays held out.
- Two stages. First, layer by layer: each of the student's MLPs learns to compute what
  the teacher's computes on the same input (mean squared error, on the inputs the
  student's own, already healed, layers give it; ``mlp_steps`` Adam steps per layer).
  A step costs one MLP, so every token is seen many times: it is where most of what a
  channel prune lost comes back. Then end to end: KL divergence between the teacher's and
  the student's next-token distributions at ``temperature``, over ``steps`` AdamW steps
  with warm-up and cosine decay.

``distil`` needs a pass before it: alone it would train the model on itself, minutes of
CPU for nothing, so a pipeline without one is refused (``UnsupportedError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from llmk.artifact import Artifact
from llmk.optimizer import Optimizer, PassOptions


class DistilOptions(PassOptions):
    #: End-to-end (KL) optimizer steps. The defaults, both stages, take about 11 min on 2 CPU
    #: cores for SmolLM2-135M (2 min sampling, 8 min layer-wise, 1 min end to end).
    steps: int = Field(32, ge=1, le=100_000)
    #: Peak learning rate of the weight matrices (AdamW).
    lr: float = Field(1e-4, gt=0, le=1e-2)
    #: Peak learning rate of the RMSNorm scales: few values, re-scaling what pruning shrank.
    norm_lr: float = Field(1e-3, gt=0, le=1e-1)
    #: Tokens per training sequence.
    seq_len: int = Field(128, ge=16, le=4096)
    batch_size: int = Field(4, ge=1, le=256)
    #: Softmax temperature of both distributions (the loss is scaled by its square).
    temperature: float = Field(1.0, gt=0, le=20)
    #: Texts the teacher samples to train on, and their length in tokens (0 samples: the
    #: calibration text alone).
    samples: int = Field(288, ge=0, le=100_000)
    sample_tokens: int = Field(96, ge=8, le=4096)
    #: Layer-wise stage: Adam steps per MLP (0: skip the stage), their learning rate, and
    #: tokens per step (drawn from every window of the data).
    mlp_steps: int = Field(300, ge=0, le=100_000)
    mlp_lr: float = Field(1e-3, gt=0, le=1e-1)
    mlp_batch: int = Field(1024, ge=1, le=65_536)
    seed: int = 0


class DistilPass(Optimizer):
    name = "distil"
    version = "2"
    stage = "source"
    backends: ClassVar[frozenset[str]] = frozenset({"torch", "onnxruntime", "openvino"})
    Options = DistilOptions
    presets: ClassVar[dict[str, dict]] = {
        # ~2 min 30 s on 2 cores for SmolLM2, 40% recovered (the defaults: ~11 min, 51%).
        "quick": {"steps": 16, "samples": 96, "mlp_steps": 100, "mlp_batch": 256},
    }

    def apply(self, artifact: Artifact, out_dir: Path, *, backend: str, options: DistilOptions) -> None:
        from llmk_pass_distil.for_source import distil

        distil(artifact, out_dir, options)
