"""Pruning healed by distillation: perplexity of the base model, of ``prune`` alone and of
``prune`` then ``distil`` on the quality gate's text (``llmk/data/wiki.txt``, held out:
distil trains on ``calibration.txt`` and the teacher's own samples), the share of the
loss recovered, and the artifacts' size and batch-1 decode tokens/s.

    python bench/distil.py [--backend onnxruntime] [--prune prune:sparsity=0.25] [--distil distil] [--runs 3]

Prints a markdown table: decode speeds are medians (min–max) of the runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmk.bench.report import Figure

PROMPT = "Write a short story about a lighthouse keeper."


def decode_rate(handle, tokens: int) -> float:
    """Batch-1 greedy decode tokens/s, the end tokens kept out so every run is ``tokens`` long."""
    no_end = {token: -100.0 for token in handle.version.engine.tokenizer.eos_ids}
    result = handle.generate(PROMPT, max_tokens=tokens, temperature=0, logit_bias=no_end)
    return (result.completion_tokens - 1) / (result.seconds - result.first_token_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--prune", default="prune:sparsity=0.25")
    parser.add_argument("--distil", default="distil")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import llmk
    from llmk.cli import artifact_bytes

    text = (Path(llmk.__file__).parent / "data" / "wiki.txt").read_text()
    kernel = llmk.Kernel()
    rows = {"base": [], "pruned": [args.prune], "pruned + distil": [args.prune, args.distil]}
    # distil runs on the source, before any export: its output (and distil.json) is the torch artifact.
    started = time.perf_counter()
    source = kernel.load("distilled", source=args.model, backend="torch", passes=rows["pruned + distil"])
    trained = json.loads((source.version.artifact.path / "distil.json").read_text())
    load_s = time.perf_counter() - started
    kernel.unload("distilled")
    report = {}
    for name, passes in rows.items():
        handle = kernel.load(name.replace(" ", ""), source=args.model, backend=args.backend, passes=passes,
                             speculative={"method": "off"})
        decode_rate(handle, 8)  # warm
        speed = Figure([decode_rate(handle, args.tokens) for _ in range(args.runs)])
        report[name] = {"perplexity": handle.perplexity(text), "bytes": artifact_bytes(handle.version.artifact.path),
                        "speed": speed}
        kernel.unload(name.replace(" ", ""))
    base, pruned, healed = (report[n]["perplexity"] for n in rows)
    print(f"Command: `python bench/distil.py --backend {args.backend} --prune {args.prune} --distil {args.distil} "
          f"--runs {args.runs}`\n")
    layerwise = (f"layer-wise: {trained['mlp_layers']} MLPs on {trained['mlp_tokens']:,} tokens, summed MSE "
                 f"{trained['mlp_mse_before']:.1f} -> {trained['mlp_mse_after']:.1f}, {trained['mlp_seconds']:.0f} s; "
                 if trained.get("mlp_layers") else "")
    print(f"distil ({json.dumps(trained['options'])}): {trained['texts']} texts ({trained['text_tokens']:,} tokens: "
          f"the calibration text and the teacher's samples); {layerwise}end to end: {trained['steps']} steps, "
          f"{trained['tokens']:,} tokens trained, {trained['train_seconds']:.0f} s; {trained['seconds']:.0f} s in all "
          f"(this load took {load_s:.0f} s).\n\nRecovered: **{(pruned - healed) / (pruned - base):.0%}** of the "
          f"perplexity pruning lost ({pruned - base:+.2f} -> {healed - base:+.2f}).\n")
    print("| model | perplexity (wiki.txt) | artifact MB | decode tokens/s | vs base |")
    print("|---|---|---|---|---|")
    for name, figures in report.items():
        print(f"| {name} | {figures['perplexity']:.2f} | {figures['bytes'] / 1e6:.0f} | {figures['speed'].cell()} | "
              f"{figures['speed'].median / report['base']['speed'].median:.2f}× |")
    kernel.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
