"""llmk's own cost per token, in one process: the same loaded runner driven by
llmk (``ModelHandle.generate``: scheduler thread, sampling, detokenizing,
stop checks, metrics) and by a bare greedy loop over ``Runner.forward``.
On torch, Hugging Face ``generate`` on the same checkpoint runs beside them.

    python bench/overhead.py [--backend B]... [--pass P]... [--runs 5] [--tokens 64]

Decode tokens/s, median (min–max), the three interleaved; prints a markdown table.
Across processes (``llmk bench``) this machine varies by up to ±15% from run to
run; in one process the comparison is much tighter.
"""

from __future__ import annotations

import argparse
import time

from llmk.bench import PROMPT
from llmk.bench.report import Figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", dest="backends", action="append", default=[])
    parser.add_argument("--pass", dest="passes", action="append", default=[])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import llmk

    flags = [f"--backend {b}" for b in args.backends] + [f"--pass {p}" for p in args.passes]
    flags += [f"--runs {args.runs}", f"--tokens {args.tokens}"]
    print(f"Command: `python bench/overhead.py {' '.join(flags)}`\n")
    print("| backend | passes | llmk generate | bare runner loop | transformers generate | llmk overhead |")
    print("|---|---|---|---|---|---|")
    with llmk.Kernel(autoload=False) as kernel:
        for backend in args.backends or ["torch", "onnxruntime", "openvino"]:
            print(row(kernel, backend, args), flush=True)
    return 0


def row(kernel, backend: str, args: argparse.Namespace) -> str:  # noqa: ANN001 - llmk.Kernel
    model = kernel.load("m", source=args.model, backend=backend, passes=args.passes)
    runner = model.version.engine.runner
    ids = model.version.engine.prompt_ids(PROMPT)

    def through_llmk() -> float:
        result = model.generate(PROMPT, max_tokens=args.tokens, temperature=0)
        return (result.completion_tokens - 1) / (result.seconds - result.first_token_seconds)

    def bare() -> float:
        from llmk.backend import SequenceStep

        engine = model.version.engine
        kv = engine.kv
        with engine.lock:  # the engine is idle: its cache is ours for the loop
            allocation = kv.admit(ids, len(ids) + args.tokens)
            kv.ensure(allocation, len(ids) + args.tokens)
            logits = runner.forward([SequenceStep(allocation.slot, ids, 0, allocation.blocks)])
            started = time.perf_counter()
            for position in range(len(ids), len(ids) + args.tokens - 1):
                token = int(logits[0].argmax())
                logits = runner.forward([SequenceStep(allocation.slot, [token], position, allocation.blocks)])
            seconds = time.perf_counter() - started
            kv.free(allocation)
        return (args.tokens - 1) / seconds

    ways = {"llmk": through_llmk, "bare": bare}
    if backend == "torch":
        ways["transformers"] = hf_generate(model.version.plan.source.path, args.tokens)
    figures = {name: Figure() for name in ways}
    for way in ways.values():  # warm-up
        way()
    for _ in range(args.runs):
        for name, way in ways.items():
            figures[name].values.append(way())
    kernel.unload("m")
    overhead = 1 - figures["llmk"].median / figures["bare"].median
    hf = figures["transformers"].cell() if "transformers" in figures else "–"
    return (f"| {backend} | {' '.join(args.passes) or 'none'} | {figures['llmk'].cell()} | "
            f"{figures['bare'].cell()} | {hf} | {overhead:+.1%} |")


def hf_generate(path: object, tokens: int):  # noqa: ANN201 - a measurement closure
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")

    def run() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            hf.generate(**inputs, max_new_tokens=1, do_sample=False)
            first = time.perf_counter() - started
            started = time.perf_counter()
            out = hf.generate(**inputs, max_new_tokens=tokens, do_sample=False)
            whole = time.perf_counter() - started
        return (out.shape[1] - inputs["input_ids"].shape[1] - 1) / (whole - first)

    return run


if __name__ == "__main__":
    raise SystemExit(main())
