"""Prefill time by prompt length: how long each pipeline takes to read a prompt of
250 to 4,000 tokens and produce its first token (one request, the library, the
prefix cache off so that every run computes the whole prompt).

    python bench/prefill.py [--pipeline BACKEND[+PASS...]]... [--lengths 250,1000,2000,4000] [--runs 3]

Every pipeline is loaded once; the runs of all pipelines and lengths are
interleaved; medians (min–max) in seconds, as a markdown table, with each
pipeline's ratio to the first one at the longest length.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmk.bench.report import Figure

TEXT = Path(__file__).resolve().parent.parent / "llmk" / "data"


def prompt_of(tokenizer, length: int) -> list[int]:  # noqa: ANN001 - llmk.tokenizer.Tokenizer
    text = " ".join(p.read_text() for p in sorted(TEXT.glob("*.txt")))
    ids = tokenizer.encode(text)
    while len(ids) < length:
        ids += ids
    return ids[:length]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--pipeline", dest="pipelines", action="append", default=[],
                        help="BACKEND or BACKEND+PASS+...; default: torch, onnxruntime+quantize:bits=4, "
                             "openvino+quantize:bits=4")
    parser.add_argument("--lengths", default="250,1000,2000,4000")
    parser.add_argument("--chunk", type=int, default=256, help="prefill_chunk (the engine's default)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import llmk

    pipelines = args.pipelines or ["torch", "onnxruntime+quantize:bits=4", "openvino+quantize:bits=4"]
    lengths = [int(n) for n in args.lengths.split(",")]
    flags = " ".join([*(f"--pipeline {p}" for p in pipelines), f"--lengths {args.lengths}", f"--chunk {args.chunk}",
                      f"--runs {args.runs}"])
    print(f"Command: `python bench/prefill.py {flags}`\n")
    figures = {(p, n): Figure() for p in pipelines for n in lengths}
    with llmk.Kernel(autoload=False) as kernel:
        models = {}
        for pipeline in pipelines:
            backend, *passes = pipeline.split("+")
            models[pipeline] = kernel.load(pipeline, source=args.model, backend=backend, passes=passes,
                                           prefill_chunk=args.chunk, prefix_caching=False, max_batch_size=1,
                                           kv_cache=max(lengths) + 16)
        prompts = {n: prompt_of(next(iter(models.values())).version.engine.tokenizer, n) for n in lengths}
        for _ in range(args.runs):
            for pipeline, model in models.items():
                engine = model.version.engine
                for n in lengths:
                    (result,) = engine.generate([prompts[n]], [llmk.SamplingParams(max_tokens=1, temperature=0)])
                    figures[(pipeline, n)].values.append(result.first_token_seconds)
    first = pipelines[0]
    longest = lengths[-1]
    print("| pipeline | " + " | ".join(f"{n} tokens (s)" for n in lengths) + f" | × {first} at {longest} |")
    print("|---|" + "---|" * (len(lengths) + 1))
    for pipeline in pipelines:
        cells = [figures[(pipeline, n)].cell(digits=2) for n in lengths]
        ratio = figures[(pipeline, longest)].median / figures[(first, longest)].median
        print(f"| {pipeline} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
