"""``llmk bench`` on a tiny model: the table's shape and its same-run baselines."""

from __future__ import annotations

import os
import subprocess
import sys


def test_bench_measures_each_backend_with_and_without_the_passes(tmp_path, tiny_llama):
    env = {**os.environ, "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, "-m", "llmk.cli", "--cache-dir", str(tmp_path / "cache"), "bench", "--model", str(tiny_llama),
         "--backend", "torch", "--backend", "onnxruntime", "--pass", "quantize", "--runs", "2", "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    table = out.read_text()
    assert table == done.stdout.rstrip("\n") + "\n"
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert sorted((r[0].strip(), r[1].strip()) for r in rows) == [
        ("onnxruntime", "none"), ("onnxruntime", "quantize"), ("torch", "none"), ("torch", "quantize")]
    for backend, passes, decode, vs_torch, vs_plain, *_ in rows:
        median, spread = decode.split(" (")
        low, high = (float(x) for x in spread.rstrip(") ").split("–"))
        assert low <= float(median) <= high
        assert (vs_plain.strip() == "–") == (passes.strip() == "none")
        if (backend.strip(), passes.strip()) == ("torch", "none"):
            assert vs_torch.strip() == "1.00"
    assert "median (min–max) of 2 runs" in table and "Machine:" in table
