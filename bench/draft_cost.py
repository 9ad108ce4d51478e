"""What a drafted token costs: the time of one sequence's decode step carrying
1 + k tokens (its last token and k drafts, every position's logits wanted), as
a share of a one-token step, per backend. ``Runner.draft_token_cost`` is this
figure; speculative decoding drafts only as many tokens as pay for it.

    python bench/draft_cost.py [--backend llamacpp] [--pass quantize:bits=4]... [--steps 20] [--runs 3]

The runner is driven directly (no scheduler) on the chat prompt's cache, at a
context of ~100 positions; each figure is the fastest of ``--runs`` timings of
``--steps`` steps. Prints ms per step for k = 0, 1, 2, 4, 8 and the cost per
draft, ``(t(k) - t(0)) / (k * t(0))``.
"""

from __future__ import annotations

import argparse
import time

DRAFTS = (0, 1, 2, 4, 8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="llamacpp")
    parser.add_argument("--pass", dest="passes", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import llmk
    from llmk.backend import SequenceStep
    from llmk.bench import PROMPT

    with llmk.Kernel(autoload=False) as kernel:
        model = kernel.load("m", source=args.model, backend=args.backend, passes=args.passes, speculative="off")
        engine = model.version.engine
        runner = engine.runner
        ids = engine.prompt_ids(PROMPT)
        engine.generate([ids], [llmk.SamplingParams(max_tokens=1)])  # the engine's KV cache, allocated
        kv = engine.kv
        room = len(ids) + args.steps + max(DRAFTS) + 1
        allocation = kv.admit(ids, room)
        kv.ensure(allocation, room)
        best: dict[int, float] = {}
        with engine.lock:  # the engine is idle: its cache is ours for the loop
            runner.forward([SequenceStep(allocation.slot, ids, 0, allocation.blocks)])
            for _ in range(args.runs):
                for k in DRAFTS:
                    started = time.perf_counter()
                    for i in range(args.steps):
                        runner.forward([SequenceStep(allocation.slot, ids[-1:] * (k + 1), len(ids) + i,
                                                     allocation.blocks, logits=k + 1)])
                    seconds = (time.perf_counter() - started) / args.steps
                    best[k] = min(best.get(k, seconds), seconds)
        kv.free(allocation)  # outside the lock: the cache's release callback takes it
    one = best[0]
    print(f"Command: `python bench/draft_cost.py --backend {args.backend}"
          f"{''.join(f' --pass {p}' for p in args.passes)} --steps {args.steps} --runs {args.runs}`\n")
    print("| drafts k | ms per step | cost per draft (share of a one-token step) |")
    print("|---|---|---|")
    for k in DRAFTS:
        per_draft = f"{(best[k] - one) / (k * one):.2f}" if k else "–"
        print(f"| {k} | {best[k] * 1000:.1f} | {per_draft} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
