"""What idle prefix cache costs llama.cpp: the time to prefill a ~1,500-token prompt
(``llmk.bench.serving``'s shared-prefix prompt, a new one each time so nothing is
reused) in a fresh cache, after 32 concurrent chats, and after a ~4,000-token prompt,
for each ``max_cached_tokens`` of the llamacpp backend (``none``: unbounded; the
default keeps 4,096). llama.cpp's attention spans every cell in use, cached or not.

    python bench/idle_cache.py [--bound none --bound 4096 ...] [--model builtin:smollm2]

Prints a markdown table of seconds to the first token (one run each).
"""

from __future__ import annotations

import argparse
import threading
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--bound", action="append", default=[], help="max_cached_tokens, or none (repeatable)")
    args = parser.parse_args()

    import llmk
    from llmk.bench import serving

    bounds = args.bound or ["none", "4096"]
    print(f"Command: `python bench/idle_cache.py {' '.join(f'--bound {b}' for b in bounds)}`\n")
    print("| max_cached_tokens | fresh cache (s) | after 32 chats (s) | after a 4,000-token prompt (s) "
          "| cached tokens |")
    print("|---|---|---|---|---|")
    with llmk.Kernel(autoload=False) as kernel:
        for number, bound in enumerate(bounds):
            limit = None if bound == "none" else int(bound)
            model = kernel.load("m", source=args.model, backend="llamacpp", max_batch_size=32,
                                options={"max_cached_tokens": limit})

            prefill(model, 1000 * number)  # warm-up
            fresh = prefill(model, 1000 * number + 1)
            chats = [threading.Thread(target=model.chat, args=(serving.short_prompt(n),),
                                      kwargs={"max_tokens": 64, "temperature": 0}) for n in range(32)]
            for chat in chats:
                chat.start()
            for chat in chats:
                chat.join()
            after_chats = prefill(model, 1000 * number + 2)
            model.chat(serving.long_prompt(number), max_tokens=8, temperature=0)
            after_long = prefill(model, 1000 * number + 3)
            cached = model.version.engine.kv.stats().cached_blocks * model.version.engine.kv.block_size
            print(f"| {bound} | {fresh:.2f} | {after_chats:.2f} | {after_long:.2f} | {cached:,} |", flush=True)
            kernel.unload("m")
    return 0


def prefill(model, seed: int) -> float:  # noqa: ANN001 - a ModelHandle
    """Seconds to the first token of a new ~1,500-token prompt."""
    from llmk.bench import serving

    started = time.perf_counter()
    model.chat(serving.prefix_prompt(seed, "What is this about?"), max_tokens=1, temperature=0)
    return time.perf_counter() - started


if __name__ == "__main__":
    raise SystemExit(main())
