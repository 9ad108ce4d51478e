"""The cost of serving a LoRA adapter, in one process: decode tokens/s of the base
model and of its adapter's variant (``NAME:ADAPTER``, the adapter merged in), at
batch 1 and with 8 concurrent requests — all for the base, all for the adapter, and
4 + 4 (variants do not share a batch with their base: that mix shows what it costs).
Also LoRA tuning's tokens/s (``llmk tune``, the adapter used here).

    python bench/adapters.py [--backend onnxruntime] [--runs 3] [--tokens 64] [--steps 16]

Prints a markdown table: medians (min–max) of the runs, each ratio to the base model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import time
from pathlib import Path

from llmk.bench.report import Figure

QUESTIONS = [f"In two sentences, what should a new owner of product {i} do first?" for i in range(8)]


def dataset(directory: Path) -> Path:
    path = directory / "care.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"How do I care for part {i} of my Quillo?"},
        {"role": "assistant", "content": f"Quillo care note {i % 3}: wipe part {i} dry and keep it from salt."}]})
        for i in range(48)) + "\n")
    return path


def rate(handle, adapters: list[str | None], tokens: int) -> float:
    """Generated tokens per second of these requests at once (one per entry, greedy). The
    model's end tokens are kept out, so that every answer is ``tokens`` long: the base and
    the adapter then decode the same number of steps."""
    no_end = {token: -100.0 for token in handle.version.engine.tokenizer.eos_ids}

    def one(pair):
        i, adapter = pair
        messages = [{"role": "user", "content": QUESTIONS[i]}]
        return handle.chat(messages, max_tokens=tokens, temperature=0, adapter=adapter, logit_bias=no_end) \
            .completion_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(adapters)) as pool:
        generated = sum(pool.map(one, enumerate(adapters)))
    return generated / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    import llmk
    from llmk.sources import as_hf
    from llmk.tune import TuneOptions, train

    kernel = llmk.Kernel()
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp))
        tuned = kernel.tune(args.model, data, max_steps=args.steps, batch_size=4, seed=7)  # cached after once
        base = as_hf(kernel.plugins.resolve_source(args.model, kernel.cache), kernel.cache)
        (Path(tmp) / "out").mkdir()
        # Tuning's speed, measured now: the same tuning, trained again outside the cache.
        fresh = train(base, data, TuneOptions(max_steps=args.steps, batch_size=4, seed=7), Path(tmp) / "out")
    handle = kernel.load("bench", source=args.model, backend=args.backend, max_batch_size=8,
                         adapters={"care": str(tuned.adapter)}, speculative={"method": "off"})
    rows = {"batch 1": [[None]], "batch 1, adapter": [["care"]], "8 at once": [[None] * 8],
            "8 at once, adapter": [["care"] * 8], "8 at once, 4 + 4": [[None, "care"] * 4]}
    figures = {name: Figure() for name in rows}
    rate(handle, [None, "care"], 8)  # warm both
    for _ in range(args.runs):
        for name, (adapters,) in rows.items():
            figures[name].values.append(rate(handle, adapters, args.tokens))
    print(f"Command: `python bench/adapters.py --backend {args.backend} --runs {args.runs} --tokens {args.tokens} "
          f"--steps {args.steps}`\n")
    print(f"Tuning ({args.model}, LoRA rank 8 on the attention projections, batch 4, {fresh.steps} steps, "
          f"{fresh.tokens:,} tokens): {fresh.tokens_per_s:.0f} tokens/s ({fresh.seconds:.1f} s); held-out "
          f"perplexity {fresh.perplexity_before:.2f} -> {fresh.perplexity_after:.2f}.\n")
    print("| requests | decode tokens/s | vs the base model |")
    print("|---|---|---|")
    for name, figure in figures.items():
        base = figures["8 at once"] if name.startswith("8") else figures["batch 1"]
        print(f"| {name} | {figure.cell()} | {figure.median / base.median:.2f}× |")
    kernel.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
