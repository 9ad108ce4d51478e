"""distil on a Hugging Face directory (safetensors + config.json): the teacher is the
source's own directory, the student the previous pass's output."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import llmk
from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk.logs import get_logger
from llmk_pass_distil.optimizer import DistilOptions

log = get_logger("llmk.distil")

#: The text ``prune`` scores its channels on; the quality gate's text (wiki.txt) stays held out.
CALIBRATION_TEXT = Path(llmk.__file__).parent / "data" / "calibration.txt"
#: Teacher samples are generated this many at a time (one batch of ``generate``).
SAMPLE_BATCH = 48


def distil(artifact: Artifact, out_dir: Path, options: DistilOptions) -> None:
    import torch
    from llmk_backend_torch.checkpoint import read_state, write_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmk.sources import load_hf_model

    teacher_dir = _teacher_dir(artifact)
    config = json.loads((artifact.path / "config.json").read_text())
    if any(key.startswith("llmk_") for key in config):
        raise UnsupportedError("distil: this model's weights are stored in llmk's own layout (quantized or fused); "
                               "distil works on plain Hugging Face weights, before quantize and fuse")
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    teacher = load_hf_model(AutoModelForCausalLM, teacher_dir, dtype=torch.float32).eval()
    student = load_hf_model(AutoModelForCausalLM, artifact.path, dtype=torch.float32)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UnsupportedError(f"distil: the student's vocabulary ({student.config.vocab_size}) is not the "
                               f"teacher's ({teacher.config.vocab_size}) in {teacher_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(artifact.tokenizer_dir))
    calibration = tokenizer(CALIBRATION_TEXT.read_text(), verbose=False)["input_ids"]  # cut into windows below
    texts = [calibration, *_teacher_samples(teacher, tokenizer, options)]
    context = getattr(student.config, "max_position_embeddings", None) or options.seq_len
    seq_len = min(options.seq_len, context)
    figures = _heal_mlps(teacher, student, texts, options, seq_len) if options.mlp_steps else {}
    figures.update(_train(teacher, student, texts, options, seq_len))
    del teacher
    trained = student.state_dict()
    original = read_state(artifact.path)
    missing = [name for name in original if name not in trained]
    if missing:
        raise UnsupportedError(f"distil: transformers does not load these weights of {artifact.source}: "
                               f"{', '.join(missing[:5])}")
    state = {name: trained[name].detach().to(tensor.dtype) for name, tensor in original.items()}
    write_checkpoint(artifact.path, out_dir, state, config)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "distil.json").write_text(json.dumps({"options": options.model_dump(), **figures}, indent=1))
    log.info("distil.finished", source=artifact.source, **figures)


def _teacher_dir(artifact: Artifact) -> Path:
    """The unoptimized model: the source's Hugging Face directory, which ``tokenizer_dir``
    names on every artifact derived from it."""
    teacher = artifact.tokenizer_dir
    if artifact.path.resolve() == teacher.resolve():
        raise UnsupportedError(
            "distil: no pass before it changed the model, so there is nothing to distil into (the student "
            "would be the teacher); put it after a lossy source pass, e.g. passes=['prune:sparsity=0.25', 'distil']")
    if not any(teacher.glob("*.safetensors")) or not (teacher / "config.json").is_file():
        raise UnsupportedError(f"distil: the teacher's weights (the unoptimized {artifact.source}) are not in "
                               f"{teacher}: distil needs a source that is a Hugging Face directory or a GGUF file")
    return teacher


def _teacher_samples(teacher: Any, tokenizer: Any, options: DistilOptions) -> list[list[int]]:
    """Texts the teacher writes from its start token: its own distribution, sampled."""
    import torch

    if not options.samples:
        return []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    end = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    began, samples = time.perf_counter(), []
    with torch.inference_mode():
        for first in range(0, options.samples, SAMPLE_BATCH):
            count = min(SAMPLE_BATCH, options.samples - first)
            ids = torch.full((count, 1), start)
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                   temperature=1.0, max_new_tokens=options.sample_tokens, pad_token_id=pad)
            for row in out.tolist():
                cut = row.index(end, 1) + 1 if end in row[1:] else len(row)  # what follows the end is padding
                if cut > 2:
                    samples.append(row[:cut])
    log.info("distil.samples_generated", samples=len(samples), tokens=sum(map(len, samples)),
             seconds=round(time.perf_counter() - began, 1))
    return samples


def _heal_mlps(teacher: Any, student: Any, texts: list[list[int]], options: DistilOptions,
               seq_len: int) -> dict[str, Any]:
    """Layer-wise distillation, before the end-to-end one: in one forward pass of the
    student over every window of the data, each MLP, when the pass reaches it, learns
    to compute what the teacher's MLP computes on the same input (mean squared error,
    ``mlp_steps`` Adam steps of ``mlp_batch`` tokens), and the pass goes on with it
    healed. A step costs one MLP, not the model, so each token is seen many times, and
    each layer learns on the inputs its healed predecessors give it. Where a prune took
    channels away, the kept ones learn to do their work. The pass holds one layer's
    activations for all the data at a time (about 1 GB for SmolLM2's 26k default tokens)."""
    import torch

    layers = _mlp_pairs(teacher, student)
    if not layers:
        log.info("distil.mlp_skipped", reason="no decoder layers with an 'mlp' module, the same count in both models")
        return {"mlp_layers": 0}
    windows = [text[i:i + seq_len] for text in texts for i in range(0, len(text), seq_len)]
    ids, mask = _padded(windows)
    valid = mask.bool()
    generator = torch.Generator().manual_seed(options.seed)
    errors: list[tuple[float, float]] = []
    began = time.perf_counter()
    bar = _progress_bar(len(layers), "distil mlp", "layer")

    def heal(teacher_mlp: Any) -> Any:
        def hook(module: Any, inputs: tuple) -> None:
            if inputs[0].shape[:-1] != valid.shape:
                raise UnsupportedError(f"distil: this model's MLPs take inputs of shape {tuple(inputs[0].shape)}, not "
                                       f"(batch, tokens, hidden); run it with mlp_steps=0 (the end-to-end stage only)")
            x = inputs[0][valid]
            errors.append(_fit_mlp(module, x, teacher_mlp(x), options, generator))
            bar.set_postfix(mse=f"{errors[-1][0]:.3f}->{errors[-1][1]:.3f}")
            bar.update(1)
        return hook

    hooks = [s.register_forward_pre_hook(heal(t)) for t, s in layers]
    try:
        with torch.no_grad():
            student.base_model(input_ids=ids, attention_mask=mask)  # no logits: the head is not needed
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()
    return {"mlp_layers": len(layers), "mlp_tokens": int(mask.sum()),
            "mlp_seconds": round(time.perf_counter() - began, 1),
            "mlp_mse_before": round(sum(b for b, _ in errors), 4), "mlp_mse_after": round(sum(a for _, a in errors), 4)}


def _mlp_pairs(teacher: Any, student: Any) -> list[tuple[Any, Any]]:
    """(teacher's, student's) MLP of each decoder layer; empty where the models have none."""
    found = []
    for model in (teacher, student):
        layers = getattr(model.base_model, "layers", None)
        if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
            return []
        found.append([layer.mlp for layer in layers])
    return list(zip(*found)) if len(found[0]) == len(found[1]) else []


def _fit_mlp(mlp: Any, x: Any, target: Any, options: DistilOptions, generator: Any) -> tuple[float, float]:
    """Adam on the MLP's mean squared error to ``target``, with cosine decay; zero weights
    stay zero. Returns the error before and after."""
    import torch
    import torch.nn.functional as F

    run = mlp.forward  # not mlp(...): this runs inside the forward hook of that very module
    params = [p for p in mlp.parameters() if p.requires_grad]
    masks = [(p, p != 0) for p in params if not bool(p.all())]
    before = F.mse_loss(run(x), target).item()
    optimizer = torch.optim.Adam(params, lr=options.mlp_lr)
    with torch.enable_grad():
        for step in range(options.mlp_steps):
            for group in optimizer.param_groups:
                group["lr"] = options.mlp_lr * 0.5 * (1 + math.cos(math.pi * step / options.mlp_steps))
            rows = torch.randint(0, len(x), (options.mlp_batch,), generator=generator)
            F.mse_loss(run(x[rows]), target[rows]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for param, keep in masks:
                    param.mul_(keep)
    return before, F.mse_loss(run(x), target).item()


def _progress_bar(total: int, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=True)


def _train(teacher: Any, student: Any, texts: list[list[int]], options: DistilOptions,
           seq_len: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    # The embedding table was not pruned; training it on a few thousand tokens would move the
    # rows of the tokens seen, and (tied) the output head, away from the rest.
    embeddings = {id(student.get_input_embeddings().weight)}
    named = [(n, p) for n, p in student.named_parameters() if id(p) not in embeddings]
    for parameter in student.get_input_embeddings().parameters():
        parameter.requires_grad_(False)
    masks = {n: p != 0 for n, p in named if not bool(p.all())}  # zeros a pass made (or found) stay zeros
    params = dict(named)
    norms = [p for n, p in named if "norm" in n]
    weights = [p for n, p in named if "norm" not in n]
    optimizer = torch.optim.AdamW([{"params": weights, "lr": options.lr}, {"params": norms, "lr": options.norm_lr}],
                                  weight_decay=0.0)
    warmup = max(1, options.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _lr_factor(i + 1, warmup, options.steps))
    rng = random.Random(options.seed)
    weights_by_length = [len(t) for t in texts]
    t2 = options.temperature ** 2
    losses, tokens, began = [], 0, time.perf_counter()
    bar = _progress_bar(options.steps, "distil", "step")
    student.train()
    try:
        for _ in range(options.steps):
            ids, mask = _batch(texts, weights_by_length, options.batch_size, seq_len, rng)
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits / options.temperature, -1)
            logits = student(input_ids=ids, attention_mask=mask).logits / options.temperature
            per_token = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none").sum(-1)
            loss = (per_token * mask).sum() / mask.sum() * t2
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            with torch.no_grad():
                for name, keep in masks.items():
                    params[name].mul_(keep)
            losses.append(loss.item())
            tokens += int(mask.sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tokens_per_s=f"{tokens / (time.perf_counter() - began):.0f}")
            bar.update(1)
    finally:
        bar.close()
    student.eval()
    first, last = losses[:5], losses[-5:]
    return {"steps": options.steps, "texts": len(texts), "text_tokens": sum(weights_by_length), "tokens": tokens,
            "train_seconds": round(time.perf_counter() - began, 1), "masked_tensors": len(masks),
            "loss_first": round(sum(first) / len(first), 4), "loss_last": round(sum(last) / len(last), 4)}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up (Adam's first steps are large), then cosine decay to zero."""
    if step <= warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batch(texts: list[list[int]], lengths: list[int], size: int, seq_len: int,
           rng: random.Random) -> tuple[Any, Any]:
    """``size`` random windows of ``seq_len`` tokens, every token of the data equally likely; padded."""
    rows = []
    for text in rng.choices(texts, weights=lengths, k=size):
        start = rng.randrange(0, len(text) - seq_len + 1) if len(text) > seq_len else 0
        rows.append(text[start:start + seq_len])
    return _padded(rows)


def _padded(rows: list[list[int]]) -> tuple[Any, Any]:
    """Token ids padded on the right, and their attention mask."""
    import torch

    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask
