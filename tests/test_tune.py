"""LoRA fine-tuning (``llmk tune``, ``Kernel.tune``): a real run on SmolLM2 lowers the
held-out perplexity of its dataset's domain and the adapter round-trips through the
cache; bad data is refused naming the line (on the tiny llama, where it is quick)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmk.errors import OptionsError
from llmk.tune import DatasetError


def chat_lines(count: int) -> list[str]:
    """A small domain: questions about a made-up product, answered in one house style."""
    parts = ["the hinge", "the battery", "the strap", "the lens", "the case", "the charger", "the screen", "the clip"]
    lines = []
    for i in range(count):
        part = parts[i % len(parts)]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"How do I care for {part} of my Quillo {i % 5 + 1}?"},
            {"role": "assistant", "content": f"Quillo care note {i % 3 + 1}: wipe {part} with a dry cloth, keep it "
                                             f"away from salt water, and register it at quillo.example/care."}]}))
    return lines


@pytest.fixture(scope="module")
def quillo(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune-data") / "quillo.jsonl"
    path.write_text("\n".join(chat_lines(40)) + "\n")
    return path


def test_tuning_smollm2_lowers_the_held_out_perplexity_and_the_adapter_round_trips(real_kernel, quillo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmk.tune import perplexity, read_samples, split

    options = {"max_steps": 8, "batch_size": 4, "learning_rate": 1e-3, "held_out": 0.2, "seed": 1}
    result = real_kernel.tune("builtin:smollm2", quillo, **options)
    assert result.held_out_samples == 8 and result.steps == 8 and result.tokens > 0
    assert result.perplexity_after < 0.8 * result.perplexity_before, result
    files = {p.name for p in result.adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tune.json"} <= files
    # Asked again: the cached adapter, not a second training.
    again = real_kernel.tune("builtin:smollm2", quillo, **options)
    assert again.adapter == result.adapter and again.seconds == result.seconds
    # The stored adapter is the one measured: loaded back with peft, the same held-out perplexity.
    from llmk.sources import as_hf

    base = as_hf(real_kernel.plugins.resolve_source("builtin:smollm2", real_kernel.cache), real_kernel.cache)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    _, held = split(read_samples(quillo, tokenizer, 2048), 0.2, 1)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32),
                                      result.adapter)
    assert perplexity(model, held) == pytest.approx(result.perplexity_after, rel=1e-4)


@pytest.mark.parametrize("content, problem", [
    ('{"text": "fine"}\n{"text": "broken"\n', r"quillo.jsonl:2: not valid JSON"),
    ('{"text": "fine"}\n\n[1, 2]\n', r"quillo.jsonl:3: each line must be a JSON object"),
    ('{"prompt": "x"}\n', r"quillo.jsonl:1: each line must be a JSON object with \"messages\""),
    ('{"messages": [{"role": "user"}]}\n', r"quillo.jsonl:1: \"messages\" must be a non-empty list"),
    ('{"text": 5}\n', r"quillo.jsonl:1: \"text\" must be a string"),
    ("  \n", r"quillo.jsonl: the file is empty"),
    ('{"text": "fine"}\n{"text": "' + "word " * 400 + '"}\n', r"quillo.jsonl:2: the sample is [\d,]+ tokens, more than "
                                                             r"the context \(64, option max_length\)"),
])
def test_bad_data_is_refused_naming_the_line(kernel, tiny_llama, tmp_path, content, problem):
    path = tmp_path / "quillo.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=problem):
        kernel.tune(str(tiny_llama), path, max_length=64)


def test_bad_options_and_modules_are_refused(kernel, tiny_llama, quillo, tmp_path):
    with pytest.raises(OptionsError, match="rank"):
        kernel.tune(str(tiny_llama), quillo, rank=0)
    with pytest.raises(OptionsError, match="colour"):
        kernel.tune(str(tiny_llama), quillo, colour="red")
    with pytest.raises(DatasetError, match="target_modules not in this model: w_gate"):
        kernel.tune(str(tiny_llama), quillo, target_modules=["q_proj", "w_gate"])
    with pytest.raises(DatasetError, match="no such file"):
        kernel.tune(str(tiny_llama), tmp_path / "missing.jsonl")


def test_llmk_tune_on_a_text_file(tiny_llama, tmp_path):
    """The command line, on a plain text file cut into pieces of max_length tokens."""
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"note {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    run = subprocess.run([sys.executable, "-m", "llmk.cli", "--cache-dir", str(tmp_path / "cache"), "tune",
                          "--model", str(tiny_llama), "--data", str(text), "--set", "max_length=32",
                          "--set", "epochs=2", "--set", "learning_rate=0.01", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["samples"] > 10 and result["perplexity_after"] < result["perplexity_before"]
    bad = subprocess.run([sys.executable, "-m", "llmk.cli", "tune", "--model", str(tiny_llama), "--data", str(text),
                          "--set", "rank"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr
