"""The ``llmk`` command line. Errors become one-line messages here, and only here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmk.errors import LlmkError

DEFAULT_CHAT_MODEL = "builtin:smollm2"
DEFAULT_EMBED_MODEL = "builtin:minilm"
EVAL_PROMPT = "Once upon a time"


def configure_logging(verbosity: int, fmt: str = "console") -> None:
    """Structured logs to stderr (stdout carries the answers). Quiet unless -v:
    errors already reach the user once, as the command's own message. The
    daemon logs at info (one event per request) unless told otherwise."""
    import structlog

    level = logging.CRITICAL if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _kernel(args: argparse.Namespace) -> Any:
    from llmk.kernel import Kernel

    return Kernel(cache_dir=args.cache_dir)


def _model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", default=default_model, help=f"model source (default {default_model})")
    parser.add_argument("--backend", default="auto", help="backend name, or auto (default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--pass", dest="passes", action="append", default=[], metavar="P[:k=v,...]",
                        help="optimization pass, repeatable, e.g. --pass quantize:bits=4,group_size=64")


def _load(kernel: Any, name: str, args: argparse.Namespace) -> Any:
    return kernel.load(name, source=args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                       passes=args.passes)


def cmd_run(args: argparse.Namespace) -> int:
    kernel = _kernel(args)
    model = _load(kernel, "run", args)
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop or None)
    from llmk.errors import UnsupportedError

    try:
        if args.raw:
            raise UnsupportedError("raw prompt requested")
        pieces = model.chat_stream([{"role": "user", "content": args.prompt}], **params)
    except UnsupportedError:  # no chat template: complete the prompt as is
        pieces = model.stream(args.prompt, **params)
    for piece in pieces:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    kernel = _kernel(args)
    model = _load(kernel, "embed", args)
    json.dump(model.embed(args.texts), sys.stdout)
    sys.stdout.write("\n")
    return 0


def artifact_bytes(path: Path) -> int:
    from llmk.cache import MANIFEST

    if path.is_file():  # a GGUF source is its own artifact
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)


def _evaluate(kernel: Any, name: str, args: argparse.Namespace, text: str, passes: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    model = kernel.load(name, source=args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                        passes=passes, max_ppl_increase=args.max_ppl_increase if passes else None)
    load_seconds = time.perf_counter() - started
    version = model.version
    result = model.generate(EVAL_PROMPT, max_tokens=args.decode_tokens, temperature=0)
    decode_seconds = result.seconds - result.first_token_seconds
    report = {
        "backend": version.backend,
        "device": version.device,
        "dtype": version.dtype,
        "passes": [str(p) for p in version.spec.passes],
        "perplexity": model.perplexity(text),
        "artifact_bytes": artifact_bytes(version.artifact.path),
        "load_seconds": load_seconds,
        "first_token_seconds": result.first_token_seconds,
        "decode_tokens_per_s": (result.completion_tokens - 1) / decode_seconds if decode_seconds > 0 else None,
    }
    kernel.unload(name)
    return report


def cmd_eval(args: argparse.Namespace) -> int:
    text = Path(args.text).read_text()
    kernel = _kernel(args)
    report = {"model": args.model, **_evaluate(kernel, "eval", args, text, args.passes)}
    if args.passes:  # the same model without the passes, measured the same way
        baseline = _evaluate(kernel, "eval-baseline", args, text, [])
        report["baseline"] = baseline
        report["perplexity_change"] = report["perplexity"] / baseline["perplexity"] - 1.0
        report["size_ratio"] = report["artifact_bytes"] / baseline["artifact_bytes"]
        if report["decode_tokens_per_s"] and baseline["decode_tokens_per_s"]:
            report["decode_speedup"] = report["decode_tokens_per_s"] / baseline["decode_tokens_per_s"]
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for key, value in report.items():
        if key == "baseline":
            continue
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    if "baseline" in report:
        b = report["baseline"]
        print(f"{'baseline':>22}: perplexity {b['perplexity']:.4g}, {b['artifact_bytes'] / 1e6:.0f} MB, "
              f"{b['decode_tokens_per_s']:.1f} tokens/s")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from llmk.bench import parse_options

    try:
        options = parse_options(args.options)
    except ValueError as error:
        print(f"llmk tune: --set: {error}", file=sys.stderr)
        return 2
    result = _kernel(args).tune(args.model, args.data, device=args.device, **options)
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    before, after = result.perplexity_before, result.perplexity_after
    print(f"adapter: {result.adapter}")
    print(f"{result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f}s "
          f"({result.tokens_per_s:.0f} tokens/s)")
    if before is not None and after is not None:
        print(f"held-out perplexity ({result.held_out_samples} samples): {before:.3f} -> {after:.3f} "
              f"({after / before - 1:+.1%})")
    return 0


def plugin_listing(kernel: Any) -> dict[str, list[dict[str, Any]]]:
    def entry(name: str, registered: Any, extra: dict[str, Any]) -> dict[str, Any]:
        cls = registered.cls
        reason = cls.availability()
        return {
            "name": name,
            "plugin": registered.plugin.name,
            "package": registered.plugin.package,
            "version": registered.plugin.version,
            "available": reason is None,
            "reason": reason,
            "install": cls.install if reason else None,
            **extra,
        }

    plugins = kernel.plugins
    return {
        "plugins": [vars(info) for info in plugins.infos.values()],
        "backends": [
            entry(name, item, {"tasks": sorted(item.cls.tasks), "devices": sorted(item.cls.speed_rank),
                               "speed_rank": item.cls.speed_rank})
            for name, item in sorted(plugins.backends.items.items())
        ],
        "passes": [
            entry(name, item, {"backends": sorted(item.cls.backends), "native": sorted(item.cls.native),
                               "presets": sorted(item.cls.presets)})
            for name, item in sorted(plugins.passes.items.items())
        ],
    }


def cmd_plugins(args: argparse.Namespace) -> int:
    listing = plugin_listing(_kernel(args))
    if args.json:
        json.dump(listing, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for kind in ("backends", "passes"):
        print(f"{kind}:")
        for item in listing[kind]:
            state = "available" if item["available"] else f"missing: {item['reason']}; {item['install']}"
            print(f"  {item['name']:<14} {item['package']} {item['version']:<8} {state}")
        if not listing[kind]:
            print("  (none)")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from llmk.cache import Cache

    cache = Cache(args.cache_dir)
    if args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.root}")
        return 0
    entries = cache.entries()
    if args.json:
        json.dump({"root": str(cache.root), "entries": entries}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"cache: {cache.root}")
    for e in entries:
        print(f"  {e['kind']:<8} {e['name']:<60} {e['bytes'] / 2**20:9.1f} MiB{'' if e['valid'] else '  INVALID'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {"server": {"host": args.host, "port": args.port}, "kernel": {"cache_dir": args.cache_dir}}
    if args.ray is not None:
        from llmk.backend import missing_modules

        if missing_modules(("ray",)) is not None:
            from llmk.ray import INSTALL

            print(f"llmk serve: --ray needs Ray Serve: {INSTALL}", file=sys.stderr)
            return 2
        from llmk import ray

        return ray.serve(args.config, None if args.ray == LOCAL_RAY else args.ray, overrides)
    from llmk.server import serve

    return serve(args.config, overrides=overrides)


#: ``--ray`` given without an address: start a Ray cluster on this machine.
LOCAL_RAY = "local"


def cmd_bench(args: argparse.Namespace) -> int:
    from llmk import bench
    from llmk.bench import report
    from llmk.bench.peers import DEFAULT_PEERS_PYTHON, PEERS

    if args.backends or args.passes:
        backends = args.backends or ["openvino", "onnxruntime", "torch"]
        pipelines = [(b, p) for b in backends for p in ([[], list(args.passes)] if args.passes else [[]])]
    else:
        pipelines = bench.QUICK_PIPELINES if args.quick else bench.FULL_PIPELINES
    peers = [] if args.no_peers else (args.peers or list(PEERS))
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise LlmkError(f"unknown peer {unknown[0]!r}; known: {', '.join(PEERS)}")
    runs = args.runs if args.runs is not None else 2 if args.quick else 5
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    llmk_options = bench.parse_options(args.llmk_options)
    command = "llmk " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("llmk") else "llmk bench"
    if args.from_json:
        data = report.from_json(Path(args.from_json).read_text())
    else:
        data = bench.run(source=args.model, pipelines=pipelines, peers=peers,
                         peers_python=args.peers_python or str(DEFAULT_PEERS_PYTHON), runs=runs,
                         serve=not args.no_serve, clients=clients, cache_dir=args.cache_dir, command=command,
                         serve_rounds=1 if args.quick else 2, tokens=args.tokens, serving_only=args.serving_only,
                         llmk_options=llmk_options, serve_parts=tuple(args.serving_parts) or None)
    table = report.markdown(data)
    if args.output:
        Path(args.output).write_text(table)
    if args.json:
        Path(args.json).write_text(report.to_json(data))
    if args.chart:
        report.chart(data, args.chart)
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmk", description="llmk: a plugin-based LLM kernel")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log lifecycle events (-vv: debug); the daemon always logs at least at info")
    parser.add_argument("--log-format", choices=["console", "json"], default="console",
                        help="how log events are written to stderr (default console: key=value)")
    parser.add_argument("--cache-dir", default=None, help="cache directory (default $LLMK_CACHE_DIR or ~/.cache/llmk)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="stream a completion to stdout")
    _model_args(run, DEFAULT_CHAT_MODEL)
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    run.add_argument("--top-p", type=float, default=None)
    run.add_argument("--top-k", type=int, default=None)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--stop", action="append", default=[], help="stop sequence, repeatable")
    run.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    run.add_argument("prompt")
    run.set_defaults(func=cmd_run)

    embed = sub.add_parser("embed", help="print embeddings of the texts as JSON")
    _model_args(embed, DEFAULT_EMBED_MODEL)
    embed.add_argument("texts", nargs="+")
    embed.set_defaults(func=cmd_embed)

    evaluate = sub.add_parser("eval", help="perplexity, artifact size, load time and decode speed")
    _model_args(evaluate, DEFAULT_CHAT_MODEL)
    evaluate.add_argument("--text", required=True, help="text file to compute perplexity on")
    evaluate.add_argument("--decode-tokens", type=int, default=64)
    evaluate.add_argument("--max-ppl-increase", type=float, default=None,
                          help="refuse the passes' artifact if perplexity rises more than this (0.01 = +1%%)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    tune = sub.add_parser("tune", help="LoRA fine-tuning on a dataset: an adapter in the cache")
    tune.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=f"model source (default {DEFAULT_CHAT_MODEL})")
    tune.add_argument("--data", required=True,
                      help='JSONL ({"messages": [...]} or {"text": ...} a line) or a text file')
    tune.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                      help="a tuning option (rank, alpha, dropout, target_modules, learning_rate, epochs, "
                           "max_steps, batch_size, max_length, held_out, seed), repeatable")
    tune.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(func=cmd_tune)

    plugins = sub.add_parser("plugins", help="list backends and passes, and whether they are available")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible daemon")
    serve.add_argument("--config", default=None, help="YAML config (default: serve builtin:smollm2 and builtin:minilm)")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, or the config's)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000, or the config's; 0 picks one)")
    serve.add_argument("--ray", nargs="?", const=LOCAL_RAY, default=None, metavar="ADDRESS",
                       help="serve on Ray Serve (the config's ray: section): join the cluster at ADDRESS "
                            "('auto': the one this machine is in), or start one here when none is given")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="llmk and its peers: decode speed, latency, load time, memory, quality, "
                                         "serving throughput")
    bench.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    bench.add_argument("--backend", dest="backends", action="append", default=[],
                       help="backend to measure, repeatable (default: openvino, onnxruntime, torch)")
    bench.add_argument("--pass", dest="passes", action="append", default=[], metavar="P[:k=v,...]",
                       help="measure each backend with this pipeline and without (default: none, quantize, "
                            "quantize:bits=4)")
    bench.add_argument("--runs", type=int, default=None, help="runs per figure, medians reported (default 5; quick 2)")
    bench.add_argument("--quick", action="store_true",
                       help="each backend's fastest pipeline, 2 runs, 1 round per client: a few minutes")
    bench.add_argument("--peer", dest="peers", action="append", default=[],
                       help="peer to compare with, repeatable (default: every one installed: transformers, "
                            "llama.cpp, openvino-genai, onnxruntime-genai)")
    bench.add_argument("--no-peers", action="store_true", help="measure llmk alone")
    bench.add_argument("--peers-python", default=None,
                       help="the peers' interpreter (default .venv-peers/bin/python, see bench/setup_peers.sh)")
    bench.add_argument("--no-serve", action="store_true", help="skip the serving figures")
    bench.add_argument("--serving-only", action="store_true",
                       help="only the serving figures: llmk serve (the pipeline given) beside llama-server")
    bench.add_argument("--serving-part", dest="serving_parts", action="append", default=[],
                       choices=["load", "interference", "prefix"],
                       help="only these serving figures, repeatable (default: all)")
    bench.add_argument("--llmk-option", dest="llmk_options", action="append", default=[], metavar="KEY=VALUE",
                       help="an option of llmk serve's model in the serving figures (e.g. prefill_chunk=256)")
    bench.add_argument("--clients", default="1,4,8,16,32", help="concurrent client counts (default 1,4,8,16,32)")
    bench.add_argument("--tokens", type=int, default=64, help="tokens per completion (default 64)")
    bench.add_argument("--output", help="also write the markdown report to this file")
    bench.add_argument("--json", help="also write every measurement as JSON to this file")
    bench.add_argument("--chart", help="also draw the figures as a PNG (needs matplotlib: llmk[bench])")
    bench.add_argument("--from-json", help="measure nothing: render the report (and chart) of a saved --json run")
    bench.set_defaults(func=cmd_bench)

    cache = sub.add_parser("cache", help="list or clear the model cache")
    cache.add_argument("action", choices=["list", "clear"], nargs="?", default="list")
    cache.add_argument("--json", action="store_true")
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(max(args.verbose, 1) if args.command == "serve" else args.verbose, args.log_format)
    # Per-load weight bars are noise in a terminal; one-time conversions still show theirs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except LlmkError as error:
        print(f"llmk: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
