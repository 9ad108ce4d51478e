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

from llmk.bench import worker
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
    assert server["name"].startswith("llmk serve") and server["error"] is None
    assert sorted(server["figures"]) == ["1", "2"]
    transformers = rows["transformers (fp32)"]["figures"]["decode_tokens_per_s"]["median"]
    best = max(r["figures"]["decode_tokens_per_s"]["median"] for r in rows.values() if r["engine"] == "llmk")
    (decode_goal,) = [g for g in report["goals"] if g["goal"].startswith("batch-1 decode")]
    assert decode_goal["value"] == f"{best / transformers:.2f}×"
    assert any(g["compared"] == "llmk torch none vs transformers (fp32)" for g in report["goals"])
    assert "llama.cpp" in " ".join(report["missing"])  # no GGUF behind a directory, or not installed: said so

    assert "× transformers" in table and "median (min–max) of 2 runs" in table and "Machine:" in table
    assert "| 1 client | 2 clients |" in table
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
