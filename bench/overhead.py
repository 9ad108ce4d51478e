"""llmk's own cost per token, in one process: the same loaded runner driven by
llmk (``ModelHandle.generate``: scheduler thread, sampling, detokenizing,
stop checks, metrics) and by a bare greedy loop over ``Runner.forward``.
"llmk" is llmk as configured by default (n-gram speculation where it pays);
"llmk, no speculation" is what the overhead compares with the bare loop. Beside
them, the runtime's own generate on the same file: Hugging Face ``generate`` for
torch, llama-cpp-python's ``Llama.generate`` (2 threads, flash attention, in a process of
its own) for llamacpp.

    python bench/overhead.py [--backend B]... [--pass P]... [--runs 5] [--tokens 64]
                             [--speculative initial_acceptance=1.0,...]

``--speculative`` sets the "llmk" row's ``speculative:`` section (default: the spec's).

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
    parser.add_argument("--speculative", default="", help="KEY=VALUE,... for the llmk row's speculative section")
    args = parser.parse_args()

    import llmk

    flags = [f"--backend {b}" for b in args.backends] + [f"--pass {p}" for p in args.passes]
    flags += [f"--runs {args.runs}", f"--tokens {args.tokens}"]
    flags += [f"--speculative {args.speculative}"] if args.speculative else []
    print(f"Command: `python bench/overhead.py {' '.join(flags)}`\n", flush=True)
    print("| backend | passes | llmk generate | llmk, no speculation | bare runner loop | runtime's own generate "
          "| llmk overhead | llmk / runtime's own |")
    print("|---|---|---|---|---|---|---|---|")
    with llmk.Kernel(autoload=False) as kernel:
        for backend in args.backends or ["torch", "onnxruntime", "openvino"]:
            print(row(kernel, backend, args), flush=True)
    return 0


def row(kernel, backend: str, args: argparse.Namespace) -> str:  # noqa: ANN001 - llmk.Kernel
    section = dict(item.split("=", 1) for item in args.speculative.split(",")) if args.speculative else {}
    model = kernel.load("m", source=args.model, backend=backend, passes=args.passes, speculative=section)
    plain = kernel.load("plain", source=args.model, backend=backend, passes=args.passes, speculative="off")
    runner = plain.version.engine.runner
    ids = model.version.engine.prompt_ids(PROMPT)

    def through(handle):  # noqa: ANN001, ANN202 - a measurement closure
        def run() -> float:
            result = handle.generate(PROMPT, max_tokens=args.tokens, temperature=0)
            return (result.completion_tokens - 1) / (result.seconds - result.first_token_seconds)
        return run

    def bare() -> float:
        from llmk.backend import SequenceStep

        engine = plain.version.engine
        kv = engine.kv
        # The engine is idle: its cache is ours for the loop. (The manager's copy and release
        # callbacks take the runner lock themselves.)
        allocation = kv.admit(ids, len(ids) + args.tokens)
        kv.ensure(allocation, len(ids) + args.tokens)
        with engine.lock:
            logits = runner.forward([SequenceStep(allocation.slot, ids, 0, allocation.blocks)])
            started = time.perf_counter()
            for position in range(len(ids), len(ids) + args.tokens - 1):
                token = int(logits[0].argmax())
                logits = runner.forward([SequenceStep(allocation.slot, [token], position, allocation.blocks)])
            seconds = time.perf_counter() - started
        kv.free(allocation)
        return (args.tokens - 1) / seconds

    ways = {"llmk": through(model), "plain": through(plain), "bare": bare}
    if backend == "torch":
        from llmk.sources import as_hf

        ways["runtime"] = hf_generate(as_hf(model.version.plan.source, kernel.cache).path, args.tokens)
    elif backend == "llamacpp":
        from llmk_backend_llamacpp.backend import gguf_file

        ways["runtime"] = llama_cpp_generate(gguf_file(model.version.artifact), ids, args.tokens)
    figures = {name: Figure() for name in ways}
    for way in ways.values():  # warm-up
        way()
    for _ in range(args.runs):
        for name, way in ways.items():
            figures[name].values.append(way())
    kernel.unload("m")
    kernel.unload("plain")
    overhead = 1 - figures["plain"].median / figures["bare"].median
    own = figures.get("runtime")
    ratio = f"{figures['llmk'].median / own.median:.2f}x" if own else "–"
    return (f"| {backend} | {' '.join(args.passes) or 'none'} | {figures['llmk'].cell()} | {figures['plain'].cell()} | "
            f"{figures['bare'].cell()} | {own.cell() if own else '–'} | {overhead:+.1%} | {ratio} |")


def llama_cpp_generate(path: object, ids: list[int], tokens: int):  # noqa: ANN201 - a measurement closure
    from llmk.bench.peers import llama_cpp_python_decode_rate

    return lambda: llama_cpp_python_decode_rate(str(path), ids, tokens)


def hf_generate(path: object, tokens: int):  # noqa: ANN201 - a measurement closure
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmk.sources import load_hf_model

    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = load_hf_model(AutoModelForCausalLM, path, dtype=torch.float32).eval()
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
