"""Speculative decoding at batch 1: decode tokens/s with and without it, greedy, on
input-grounded tasks (rewrite, summarise, extract from a given text of ~300 words:
bench/grounded_prompts.jsonl) and on plain chat prompts.

    python bench/speculative.py [--backend onnxruntime] [--pass quantize:bits=4]... [--max-tokens 128]
                                [--runs 3] [--speculative num_draft=4,...]... [--streams 1] [--json FILE]

The model is loaded once without speculation (``speculative: off``) and once per
``--speculative`` setting (default: the spec's defaults, n-gram lookup), each with
the prefix cache off, so that every request starts from a fresh cache and computes
its whole prompt. Runs alternate between the settings, prompt by prompt; each
figure is the median over ``--runs`` of the decode rate (tokens after the first,
over the time after the first), per kind of prompt, with the acceptance rate and
the tokens per decoding step of the speculating settings. Greedy outputs are
compared with the setting without speculation and the differences listed: there
should be none, except on runtimes whose multi-row steps compute differently from
single-row ones (onnxruntime's int8-compute int4 kernels), where batching changes
greedy output too. ``--streams N`` runs N copies of each prompt at once and reports
their decode tokens over the time from the last first token to the last end (what
sets ``max_batch``). Any
backend works, including third-party ones (``--backend llamacpp``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GROUNDED = HERE / "grounded_prompts.jsonl"
CHAT = [
    "Write a short poem about the sea at night.",
    "What are three good ways to learn a new language?",
    "Explain why the sky is blue to a ten-year-old.",
    "Tell me a short story about a dragon who loves books.",
    "Give me some ideas for a birthday party in the garden.",
    "What should I pack for a week of hiking in the mountains?",
]


def prompts() -> list[dict[str, Any]]:
    """Every prompt as chat messages, with its kind (rewrite, summarise, extract, chat)."""
    found = []
    for line in GROUNDED.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            found.append({"id": item["id"], "kind": item["task"],
                          "messages": [{"role": "user", "content": f"{item['instruction']}\n\n{item['text']}"}]})
    found += [{"id": f"chat-{i}", "kind": "chat", "messages": [{"role": "user", "content": text}]}
              for i, text in enumerate(CHAT)]
    return found


def speculative_setting(text: str) -> dict[str, Any]:
    """``num_draft=4,max_batch=2`` -> the ``speculative:`` section (``ngram`` alone names the method)."""
    from llmk.spec import PassSpec

    parsed = PassSpec.parse(f"speculative:{text}" if "=" in text else text)
    return parsed.options if "=" in text else {"method": parsed.name}


def run_case(model: Any, messages: list[dict[str, str]], max_tokens: int, streams: int) -> tuple[Any, float | None]:
    """One greedy answer (``streams`` copies at once) and its decode rate: the tokens
    after each stream's first, over the time from the last first token to the last end."""
    results: list[Any] = [None] * streams
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * streams

    def one(i: int) -> None:
        started = time.perf_counter()
        results[i] = result = model.chat(messages, max_tokens=max_tokens, temperature=0)
        spans[i] = (started + result.first_token_seconds, started + result.seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    decode = max(end for _, end in spans) - max(first for first, _ in spans)
    tokens = sum(r.completion_tokens - 1 for r in results)
    return results[0], tokens / decode if tokens > 0 and decode > 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--pass", dest="passes", action="append", default=[], help="e.g. quantize:bits=4")
    parser.add_argument("--draft", default=None, help="a draft model's source (then the settings default to it)")
    parser.add_argument("--speculative", action="append", default=[],
                        help="a speculating setting, e.g. num_draft=4,max_batch=4 (repeat to compare several)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=1, help="copies of each prompt run at once")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kinds", default="rewrite,summarise,extract,chat", help="which prompts to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--llama-cpp-python", action="store_true",
                        help="also run llama-cpp-python on the GGUF llamacpp runs (a pass's output too) "
                             "or, on other backends, the GGUF source")
    args = parser.parse_args()

    import llmk
    from llmk.bench.peers import llama_cpp_python_decode_rate

    settings = {"off": {"method": "off"}}
    for text in args.speculative or ["default"]:
        settings[text] = {} if text == "default" else speculative_setting(text)
    kinds = args.kinds.split(",")
    cases = [p for p in prompts() if p["kind"] in kinds]
    flags = " ".join([f"--backend {args.backend}", *(f"--pass {p}" for p in args.passes),
                      *(f"--speculative {s}" for s in args.speculative), f"--max-tokens {args.max_tokens}",
                      f"--runs {args.runs}", *([f"--draft {args.draft}"] if args.draft else []),
                      *([f"--streams {args.streams}"] if args.streams > 1 else []),
                      *(["--llama-cpp-python"] if args.llama_cpp_python else [])])
    print(f"Command: `python bench/speculative.py {flags}`\n")
    rates: dict[tuple[str, str], list[float]] = {}
    counts: dict[str, dict[str, int]] = {name: {"drafted": 0, "accepted": 0, "steps": 0, "tokens": 0}
                                         for name in settings}
    mismatches: list[str] = []
    with llmk.Kernel(autoload=False) as kernel:
        models = {}
        for name, section in settings.items():
            draft = args.draft if section.get("method") != "off" else None
            models[name] = kernel.load(f"spec-{len(models)}", source=args.model, backend=args.backend,
                                       passes=args.passes, max_batch_size=args.streams, prefix_caching=False,
                                       speculative=section, draft=draft)
        first = next(iter(models.values()))
        gguf = None
        if args.llama_cpp_python:  # the file llamacpp runs (a pass's output too), else the source
            if args.backend == "llamacpp":
                from llmk_backend_llamacpp.backend import gguf_file

                gguf = gguf_file(first.version.artifact)
            else:
                gguf = first.version.plan.source.path
        if gguf is not None and gguf.suffix != ".gguf":
            raise SystemExit(f"--llama-cpp-python needs a GGUF source; {args.model} is not one")
        for _ in range(args.runs):
            for case in cases:
                if gguf is not None:
                    ids = first.version.engine.tokenizer.apply_chat_template(case["messages"])
                    rates.setdefault(("llama-cpp-python", case["kind"]), []).append(
                        llama_cpp_python_decode_rate(gguf, ids, args.max_tokens))
                reference = None
                for name, model in models.items():
                    engine = model.version.engine
                    before = engine.speculation_stats() or {}
                    result, rate = run_case(model, case["messages"], args.max_tokens, args.streams)
                    after = engine.speculation_stats()
                    if rate is not None:
                        rates.setdefault((name, case["kind"]), []).append(rate)
                    for key, field in (("drafted", "spec_draft_tokens"), ("accepted", "spec_accepted_tokens"),
                                       ("steps", "decode_steps"), ("tokens", "decode_tokens")):
                        counts[name][key] += after[field] - before.get(field, 0)
                    if reference is None:
                        reference = result.token_ids
                    elif result.token_ids != reference:
                        mismatches.append(f"{case['id']} ({name})")

    figures: dict[str, Any] = {"command": f"python bench/speculative.py {flags}", "settings": settings, "rows": []}
    print(f"| setting | {' | '.join(f'{k} tok/s' for k in kinds)} | acceptance | tokens/step |")
    print("|---|" + "---|" * (len(kinds) + 2))
    for name in [*settings, *(["llama-cpp-python"] if args.llama_cpp_python else [])]:
        cells, row = [], {"setting": name}
        for kind in kinds:
            values = rates.get((name, kind), [])
            median = statistics.median(values) if values else float("nan")
            base = rates.get(("off", kind), [])
            ratio = median / statistics.median(base) if values and base else float("nan")
            cells.append(f"{median:.1f}" + ("" if name == "off" else f" ({ratio:.2f}×)"))
            row[kind] = {"tokens_per_second": round(median, 2), "speedup": round(ratio, 3), "samples": len(values)}
        c = counts.get(name, {"drafted": 0, "accepted": 0, "steps": 0, "tokens": 0})
        acceptance = c["accepted"] / c["drafted"] if c["drafted"] else 0.0
        per_step = c["tokens"] / c["steps"] if c["steps"] else 0.0
        row.update(acceptance=round(acceptance, 4), tokens_per_step=round(per_step, 3), drafted=c["drafted"])
        figures["rows"].append(row)
        print(f"| {name} | {' | '.join(cells)} | {acceptance:.2f} | {per_step:.2f} |")
    print(f"\nGreedy outputs that differ from the setting without speculation: {len(mismatches)}"
          + (f" ({', '.join(mismatches)})" if mismatches else ""))
    figures["mismatches"] = mismatches
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
