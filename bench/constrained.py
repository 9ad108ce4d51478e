"""What constrained decoding costs: decode speed with and without a JSON schema at
batch 1 and batch 8, and the grammar's token mask per token and as a share of the
decode time (goal: ≤ 10%). With ``--engines``, the per-token mask of llguidance
(what llmk uses) and xgrammar on the same schema and tokenizer, outside the engine.

    python bench/constrained.py [--pipeline onnxruntime+quantize:bits=4] [--batches 1,8] [--runs 3] [--engines]
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

from llmk.bench.report import Figure

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string"}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "tags", "member"],
}
QUESTIONS = ["Describe a person.", "Describe a teacher.", "Describe a friend.", "Describe a baker.",
             "Describe a pilot.", "Describe a doctor.", "Describe a farmer.", "Describe a singer."]


class MaskClock:
    """Adds up the time spent in grammar masks (``GrammarMask.__call__``)."""

    def __init__(self) -> None:
        from llmk.constraints import GrammarMask

        self.seconds, self.calls = 0.0, 0
        original = GrammarMask.__call__

        def timed(mask, output_ids, logits):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            try:
                return original(mask, output_ids, logits)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        GrammarMask.__call__ = timed  # type: ignore[method-assign]

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def in_engine(args: argparse.Namespace) -> None:
    import llmk

    backend, *passes = args.pipeline.split("+")
    batches = [int(b) for b in args.batches.split(",")]
    clock = MaskClock()
    figures = {(b, kind): Figure() for b in batches for kind in ("plain", "json", "mask_us", "share")}
    with llmk.Kernel(autoload=False) as kernel:
        model = kernel.load("m", source=args.model, backend=backend, passes=passes, max_batch_size=max(batches))
        model.chat([{"role": "user", "content": "Hi"}], max_tokens=4, json_schema=SCHEMA)  # grammar tokenizer built
        for _ in range(args.runs):
            for batch in batches:
                chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:batch]]
                for kind in ("plain", "json"):
                    extra = {"json_schema": SCHEMA} if kind == "json" else {}
                    clock.reset()
                    start = time.perf_counter()
                    results = _together(model, chats, args.tokens, extra)
                    seconds = time.perf_counter() - start
                    tokens = sum(r.completion_tokens for r in results)
                    figures[(batch, kind)].values.append(tokens / seconds)
                    if kind == "json":
                        for r in results:
                            json.loads(r.text)  # every output parses
                        figures[(batch, "mask_us")].values.append(clock.seconds / clock.calls * 1e6)
                        figures[(batch, "share")].values.append(clock.seconds / seconds)
    print(f"Pipeline: `{args.pipeline}`, chat answers of up to {args.tokens} tokens at temperature 0, "
          f"a {len(SCHEMA['properties'])}-property JSON schema; median (min–max) of {args.runs} runs.\n")
    print("| batch | unconstrained tokens/s | json_schema tokens/s | mask per token (µs) | mask share of decode time |")
    print("|---|---|---|---|---|")
    for b in batches:
        print(f"| {b} | {figures[(b, 'plain')].cell()} | {figures[(b, 'json')].cell()} | "
              f"{figures[(b, 'mask_us')].cell(digits=0)} | {figures[(b, 'share')].cell(digits=1, scale=100)} % |")


def _together(model, chats, tokens, extra):  # noqa: ANN001, ANN202
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(chats)) as pool:
        return list(pool.map(lambda c: model.chat(c, max_tokens=tokens, temperature=0, **extra), chats))


def engines(args: argparse.Namespace) -> None:
    """Per-token mask of each grammar engine, walking a valid document's tokens."""
    import llmk

    with llmk.Kernel(autoload=False) as kernel:
        tokenizer = kernel.load("m", source=args.model, backend="torch").version.engine.tokenizer
    document = json.dumps({"name": "Alice Smith", "age": 42, "city": "Paris", "tags": ["a", "c"], "member": True})
    ids = tokenizer.encode(document, special=False)
    hf, vocab = tokenizer.hf_tokenizer, tokenizer.vocab_size
    rows = []
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    lltok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    compile_s, mask = Figure(), Figure()
    for _ in range(args.runs):
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                                 defaults={"whitespace_flexible": True})
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s.values.append(time.perf_counter() - start)
        bitmask, spent = llguidance.numpy.allocate_token_bitmask(1, vocab), 0.0
        for token in ids:
            start = time.perf_counter()
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
            spent += time.perf_counter() - start
            assert matcher.consume_token(token)
        mask.values.append(spent / len(ids))
    rows.append((f"llguidance {version('llguidance')}", compile_s, mask))
    try:
        import xgrammar
    except ImportError:
        xgrammar = None
    if xgrammar is not None:
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        compile_s, mask = Figure(), Figure()
        for _ in range(args.runs):
            start = time.perf_counter()
            compiled = xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA))
            matcher = xgrammar.GrammarMatcher(compiled)
            compile_s.values.append(time.perf_counter() - start)
            bitmask, spent = xgrammar.allocate_token_bitmask(1, vocab), 0.0
            for token in ids:
                start = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                spent += time.perf_counter() - start
                assert matcher.accept_token(token)
            mask.values.append(spent / len(ids))
        rows.append((f"xgrammar {version('xgrammar')}", compile_s, mask))
    print(f"\nGrammar engines alone: the same schema, the model's {vocab}-token vocabulary, the mask before each "
          f"of the {len(ids)} tokens of a valid document; median (min–max) of {args.runs} runs.\n")
    print("| engine | compile (ms) | mask per token (µs) |")
    print("|---|---|---|")
    for name, compile_s, mask in rows:
        print(f"| {name} | {compile_s.cell(digits=2, scale=1e3)} | {mask.cell(digits=0, scale=1e6)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--pipeline", default="onnxruntime+quantize:bits=4")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", action="store_true", help="also compare llguidance and xgrammar")
    args = parser.parse_args()
    print(f"Command: `python bench/constrained.py --pipeline {args.pipeline} --batches {args.batches} "
          f"--tokens {args.tokens} --runs {args.runs}{' --engines' if args.engines else ''}`\n")
    in_engine(args)
    if args.engines:
        engines(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
