"""LoRA fine-tuning (``llmk tune``, ``Kernel.tune``): a causal LM adapted to a
dataset with peft, stored as an adapter artifact in the cache.

- Data: a JSONL file, one sample a line, ``{"messages": [{"role", "content"}, ...]}``
  (rendered with the model's chat template) or ``{"text": "..."}``; or a plain text
  file, cut into pieces of ``max_length`` tokens. A malformed line, an empty file or
  a sample longer than the context is a ``DatasetError`` naming the line.
- A held-out part (``held_out``, chosen with ``seed``) is scored before and after
  (perplexity: the mean negative log-likelihood of its tokens, exponentiated).
- Training: peft's LoRA on ``target_modules`` (rank, alpha, dropout), AdamW,
  ``epochs`` over the rest (or ``max_steps`` steps), the loss on every token; a progress
  bar shows the loss, tokens/s and the time left.
- The adapter (``adapter_model.safetensors``, ``adapter_config.json``) and
  ``tune.json`` (the options and figures) go to ``adapters/`` in the cache, keyed
  by the base model's digest, the data's and the options: the same tuning asked
  again is found there, not run again.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from llmk.errors import LlmkError
from llmk.logs import get_logger

if TYPE_CHECKING:
    from llmk.artifact import Artifact
    from llmk.cache import Cache

log = get_logger("llmk.tune")

#: Bumped when the training changes what an adapter holds for the same inputs.
TUNE_VERSION = "2"


class DatasetError(LlmkError):
    """The dataset cannot be tuned on: ``where`` names the file (and line), ``problem`` why."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


class TuneOptions(BaseModel):
    """How ``tune`` adapts a model (``llmk tune --set KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = Field(2e-4, gt=0)
    epochs: int = Field(1, ge=1)
    #: Optimizer steps; when set it decides, not ``epochs`` (as in Hugging Face's Trainer).
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    #: Longest sample in tokens (None: the model's context); a longer one is an error.
    max_length: int | None = Field(None, ge=8)
    #: Fraction of the samples scored and never trained on (at least one when there are two).
    held_out: float = Field(0.1, ge=0, lt=1)
    seed: int = 0


@dataclass
class TuneResult:
    """An adapter and what tuning it did."""

    adapter: Path
    base: str
    samples: int
    held_out_samples: int
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    perplexity_before: float | None
    perplexity_after: float | None
    options: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "adapter": str(self.adapter)}


# -- data -------------------------------------------------------------------------------------------------


def read_samples(path: Path, tokenizer: Any, max_length: int) -> list[list[int]]:
    """The token ids of every sample in ``path`` (see the module's docstring)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(str(path), f"cannot read it: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DatasetError(str(path), f"not UTF-8 text: {error.reason}") from None
    if not raw.strip():
        raise DatasetError(str(path), "the file is empty: nothing to tune on")
    if path.suffix != ".jsonl":
        ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
        return [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
    samples = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except ValueError as error:
            raise DatasetError(where, f"not valid JSON: {error}") from None
        ids = _sample_ids(where, value, tokenizer)
        if len(ids) > max_length:
            raise DatasetError(where, f"the sample is {len(ids):,} tokens, more than the context "
                                      f"({max_length:,}, option max_length)")
        if len(ids) > 1:
            samples.append(ids)
    if not samples:
        raise DatasetError(str(path), "no sample with text in it")
    return samples


def _sample_ids(where: str, value: Any, tokenizer: Any) -> list[int]:
    if not isinstance(value, dict) or not ({"messages", "text"} & set(value)):
        raise DatasetError(where, 'each line must be a JSON object with "messages" (a chat) or "text"')
    if "text" in value:
        if not isinstance(value["text"], str):
            raise DatasetError(where, '"text" must be a string')
        ids = tokenizer(value["text"], add_special_tokens=True)["input_ids"]
        return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids
    messages = value["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DatasetError(where, '"messages" must be a non-empty list of {"role": ..., "content": ...} strings')
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    return list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)


def split(samples: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held out): a seeded choice, at least one held out when there are two or more."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    count = 0 if fraction == 0 or len(samples) < 2 else max(1, round(len(samples) * fraction))
    held = set(order[:count])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


# -- training -----------------------------------------------------------------------------------------------


def perplexity(model: Any, samples: list[list[int]]) -> float:
    """exp(mean negative log-likelihood) of every token after the first of each sample."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for ids in samples:
            tensor = torch.tensor([ids], device=device)
            loss = model(input_ids=tensor, labels=tensor).loss
            total += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    return math.exp(total / count)


def _batches(samples: list[list[int]], size: int, pad: int, rng: random.Random) -> list[tuple[Any, Any, Any]]:
    import torch

    order = list(range(len(samples)))
    rng.shuffle(order)
    out = []
    for start in range(0, len(order), size):
        chunk = [samples[i] for i in order[start:start + size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        for row, sample in enumerate(chunk):
            ids[row, :len(sample)] = torch.tensor(sample)
            mask[row, :len(sample)] = 1
            labels[row, :len(sample)] = torch.tensor(sample)
        out.append((ids, mask, labels))
    return out


def train(base: Artifact, data: Path, options: TuneOptions, out: Path, *, device: str = "cpu") -> TuneResult:
    """Tune ``base`` (a Hugging Face directory) on ``data``; write the adapter to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmk.sources import load_hf_model

    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    model = load_hf_model(AutoModelForCausalLM, base.path, dtype=torch.float32).to(device)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    max_length = min(options.max_length or context, context)
    samples = read_samples(data, tokenizer, max_length)
    training, held = split(samples, options.held_out, options.seed)
    if not training:
        raise DatasetError(str(data), "every sample is held out: lower held_out or add samples")
    missing = [m for m in options.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())]
    if missing:
        raise DatasetError(str(data), f"target_modules not in this model: {', '.join(missing)}")
    before = perplexity(model, held) if held else None
    torch.manual_seed(options.seed)
    model = get_peft_model(model, LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                                             target_modules=list(options.target_modules), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    per_epoch = -(-len(training) // options.batch_size)
    total = options.max_steps or per_epoch * options.epochs
    rng, steps, tokens = random.Random(options.seed), 0, 0
    started = time.perf_counter()
    bar = tqdm(total=total, desc="tune", unit="step", disable=None, leave=True)
    try:
        model.train()
        while steps < total:
            for ids, mask, labels in _batches(training, options.batch_size, pad, rng):
                loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
                tokens += int(mask.sum())
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss.item():.3f}", tokens_per_s=f"{tokens / elapsed:.0f}")
                bar.update(1)
                if steps >= total:
                    break
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    after = perplexity(model, held) if held else None
    model.save_pretrained(out)
    result = TuneResult(adapter=out, base=base.source, samples=len(samples), held_out_samples=len(held),
                        steps=steps, tokens=tokens, seconds=round(seconds, 3),
                        tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
                        perplexity_before=before, perplexity_after=after,
                        options=options.model_dump(mode="json"))
    (out / "tune.json").write_text(json.dumps(result.as_dict(), indent=1))
    log.info("tune.finished", base=base.source, steps=steps, tokens=tokens, seconds=round(seconds, 1),
             perplexity_before=before, perplexity_after=after)
    return result


def tune(base: Artifact, data: Path, options: TuneOptions, cache: Cache, *, device: str = "cpu") -> TuneResult:
    """The adapter of ``base`` tuned on ``data`` with ``options``: from the cache, or trained."""
    import peft

    from llmk.cache import key_digest

    data = Path(data).expanduser()
    if not data.is_file():
        raise DatasetError(str(data), "no such file")
    digest = key_digest("llmk-tune", TUNE_VERSION, peft.__version__, base.digest, cache.file_digest(data),
                        options.model_dump_json())
    name = f"{Path(base.source).name.replace(':', '-')}-{digest[:16]}"
    path = cache.build("adapters", name, lambda tmp: train(base, data, options, tmp, device=device),
                       describe=f"tune {base.source} on {data.name}")
    found = json.loads((path / "tune.json").read_text())
    return TuneResult(**{**found, "adapter": path})
