"""llama.cpp's own batch-1 decode speed by context shape, with nothing of llmk's engine
in the loop: the llamacpp runner's ``Model.context`` and ``llama_decode`` from this
thread, greedy argmax in NumPy. Whether the serving context llmk creates (a unified
cache of many cells for several sequences) slows a single stream.

    python bench/raw_decode.py [--context CELLS,SEQUENCES]... [--runs 3] [--tokens 64]

Default contexts: 2,048 cells for 1 sequence (llama-cpp-python's shape) and 8,704 for 8
(llmk's default serving context). The contexts are alternated; decode tokens/s, median
(min–max) of the runs, each after a fresh 40-token prompt.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", dest="contexts", action="append", default=[])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    contexts = [tuple(int(x) for x in c.split(",")) for c in args.contexts] or [(2048, 1), (8704, 8)]

    import llama_cpp as llama
    import numpy as np
    from llmk_backend_llamacpp.backend import LlamaCppOptions, gguf_file
    from llmk_backend_llamacpp.runner import load_model

    import llmk
    from llmk.sources import resolve_source

    with llmk.Kernel(autoload=False) as kernel:
        path = gguf_file(resolve_source("builtin:smollm2", kernel.cache))
    model = load_model("builtin:smollm2", path, "cpu", LlamaCppOptions())
    prompt = list(range(100, 140))

    def run(cells: int, sequences: int) -> float:
        context = model.context(n_ctx=cells, n_seq=sequences)
        try:
            def decode(tokens: list[int], start: int) -> np.ndarray:
                batch = llama.llama_batch_get_one((llama.llama_token * len(tokens))(*tokens), len(tokens))
                batch.pos = (llama.llama_pos * len(tokens))(*range(start, start + len(tokens)))
                if llama.llama_decode(context, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                return np.ctypeslib.as_array(llama.llama_get_logits_ith(context, -1), shape=(model.vocab,))

            logits = decode(prompt, 0)
            started = time.perf_counter()
            for position in range(len(prompt), len(prompt) + args.tokens):
                logits = decode([int(logits.argmax())], position)
            return args.tokens / (time.perf_counter() - started)
        finally:
            llama.llama_free(context)

    results: dict[tuple[int, int], list[float]] = {c: [] for c in contexts}
    for _ in range(args.runs):
        for shape in contexts:
            results[shape].append(run(*shape))
    flags = [f"--context {c},{s}" for c, s in contexts] + [f"--runs {args.runs}", f"--tokens {args.tokens}"]
    print(f"Command: `python bench/raw_decode.py {' '.join(flags)}`\n")
    print("| cells | sequences | decode tokens/s |")
    print("|---|---|---|")
    for (cells, sequences), values in results.items():
        print(f"| {cells:,} | {sequences} | {statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f}) |")
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
