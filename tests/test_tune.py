"""LoRA fine-tuning (``llmk tune``, ``Kernel.tune``): a real run on SmolLM2 lowers the
held-out perplexity of its dataset's domain and the adapter round-trips through the
cache; bad data is refused naming the line (on the tiny llama, where it is quick)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import llmk
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
    with pytest.raises(llmk.UnsupportedError, match="does not run on 'tpu'"):
        kernel.tune(str(tiny_llama), quillo, device="tpu")


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


# -- adapters served per request ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(real_kernel, quillo, tmp_path_factory):
    """Two adapters of SmolLM2: the Quillo care notes, and terse pirate answers."""
    pirate = tmp_path_factory.mktemp("tune-pirate") / "pirate.jsonl"
    pirate.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: where is the {thing}?"},
        {"role": "assistant", "content": f"Arr, the {thing} be buried on Skull Isle, matey."}]})
        for i, thing in enumerate(["map", "gold", "ship", "parrot", "rum", "key", "chest", "flag"] * 3)) + "\n")
    options = {"max_steps": 8, "batch_size": 4, "learning_rate": 1e-3, "held_out": 0.2, "seed": 1}
    return {"quillo": str(real_kernel.tune("builtin:smollm2", quillo, **options).adapter),
            "pirate": str(real_kernel.tune("builtin:smollm2", pirate, **options).adapter)}


QUESTION = [{"role": "user", "content": "How do I care for the strap of my Quillo 2?"}]


def test_on_torch_two_adapters_and_none_share_one_batch_and_answer_as_alone(real_kernel, adapters):
    import concurrent.futures

    from llmk.errors import ModelNotFoundError

    chat = real_kernel.load("adapted", source="builtin:smollm2", backend="torch", adapters=adapters)
    assert {"adapted", "adapted:quillo", "adapted:pirate"} <= set(real_kernel.names())
    assert real_kernel.lifecycle.names().count("adapted:quillo") == 0  # no variant: one version serves all three
    engine = chat.version.engine
    alone = {adapter: chat.chat(QUESTION, max_tokens=20, temperature=0, adapter=adapter)
             for adapter in (None, "quillo", "pirate")}
    assert len({r.text for r in alone.values()}) == 3, alone  # each adapter changes the answer
    assert "quillo care" in alone["quillo"].text.lower() and "quillo care" not in alone[None].text.lower()
    assert min(r.completion_tokens for r in alone.values()) >= 3
    assert real_kernel.get("adapted:pirate").chat(QUESTION, max_tokens=20, temperature=0).text == alone["pirate"].text
    # At once: the engine is held while the three queue, so they are admitted together and
    # decode in the same steps (rows of two adapters and of none in one forward).
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        with engine.lock:
            futures = {adapter: pool.submit(chat.chat, QUESTION, max_tokens=20, temperature=0, adapter=adapter)
                       for adapter in alone}
            deadline = time.monotonic() + 120
            while sum(engine.backlog()[k] for k in ("queued", "running")) < 3:
                assert time.monotonic() < deadline, engine.backlog()
                time.sleep(0.01)
            first_step = engine.scheduler.steps
        together = {adapter: future.result(timeout=300) for adapter, future in futures.items()}
    assert {a: r.token_ids for a, r in together.items()} == {a: r.token_ids for a, r in alone.items()}
    shared = list(engine.scheduler.recent_steps)[-(engine.scheduler.steps - first_step):]
    assert max(rows for rows, _ in shared) == 3, shared
    with pytest.raises(ModelNotFoundError):
        chat.generate("hi", max_tokens=2, adapter="nope")
    # Adapters change at run time without touching the base model's version.
    base_version = chat.version.number
    real_kernel.load("adapted", source="builtin:smollm2", backend="torch", adapters={"quillo": adapters["quillo"]})
    assert chat.version.number == base_version
    assert "adapted:pirate" not in real_kernel.names() and "adapted:quillo" in real_kernel.names()
    with pytest.raises(ModelNotFoundError):
        chat.generate("hi", max_tokens=2, adapter="pirate")
    real_kernel.unload("adapted")
    assert not [n for n in real_kernel.names() if n.startswith("adapted")]


def test_on_torch_a_step_of_one_adapter_runs_merged_and_matches_the_per_row_path(real_kernel, adapters):
    """A step whose rows all use one adapter runs on merged weights; a mixed step on the
    per-row hooks; the two agree, and the base model's own weights come back bit for bit."""
    import numpy as np

    from llmk.backend import SequenceStep

    chat = real_kernel.load("merged", source="builtin:smollm2", backend="torch", adapters=adapters)
    engine = chat.version.engine
    runner, kv = engine.runner, engine.kv
    quillo, pirate = engine.adapter("quillo").weights, engine.adapter("pirate").weights
    ids = engine.prompt_ids("How do I care for the strap of my Quillo 2?")
    with engine.lock:
        base = runner.logits(ids)
        before = runner.memory_bytes()
        merged = {"quillo": runner.logits(ids, quillo), "pirate": runner.logits(ids, pirate)}
        assert runner.memory_bytes() == before  # the merge buffers were counted at load
        assert runner.logits(ids).tobytes() == base.tobytes()  # the layers' own weights, untouched
        # One forward, three rows: the per-row path.
        allocations = [kv.admit(ids, len(ids) + 1) for _ in range(3)]
        for allocation in allocations:
            kv.ensure(allocation, len(ids))
        mixed = runner.forward([SequenceStep(a.slot, ids, 0, a.blocks, logits=len(ids), adapter=w)
                                for a, w in zip(allocations, (quillo, None, pirate))])
        for allocation in allocations:
            kv.free(allocation)
    rows = np.split(mixed, 3)
    np.testing.assert_allclose(rows[0], merged["quillo"], atol=1e-3)
    np.testing.assert_allclose(rows[2], merged["pirate"], atol=1e-3)
    np.testing.assert_allclose(rows[1], base, atol=1e-3)
    assert np.abs(merged["quillo"] - base).max() > 0.1  # the adapter does change the logits
    # One buffer per adapted layer (q, k, v, o of every layer), shared by the adapters.
    config = runner.model.config
    width = config.hidden_size
    kv_width = config.num_key_value_heads * (width // config.num_attention_heads)
    model_bytes = sum(t.numel() * t.element_size() for t in (*runner.model.parameters(), *runner.model.buffers()))
    buffers = before - model_bytes - quillo.nbytes() - pirate.nbytes()
    assert buffers == config.num_hidden_layers * 4 * (2 * width * width + 2 * width * kv_width)
    # Without adapters, the buffers go (at the next step) and the base answers as it did.
    real_kernel.load("merged", source="builtin:smollm2", backend="torch", adapters={})
    del quillo, pirate
    assert chat.generate("How do I care", max_tokens=1, temperature=0).completion_tokens == 1
    assert runner.memory_bytes() == model_bytes
    with engine.lock:
        assert runner.logits(ids).tobytes() == base.tobytes()
    real_kernel.unload("merged")


def test_an_adapter_on_a_graph_backend_is_merged_and_answers_as_on_torch(real_kernel, adapters):
    torch_chat = real_kernel.load("adapted-torch", source="builtin:smollm2", backend="torch",
                                  adapters={"quillo": adapters["quillo"]})
    graph_chat = real_kernel.load("adapted-ort", source="builtin:smollm2", backend="onnxruntime",
                                  adapters={"quillo": adapters["quillo"]})
    # The base first: its cached prompt blocks must not serve the adapter's rows (other keys and values).
    torch_chat.chat(QUESTION, max_tokens=2, temperature=0)
    expected = torch_chat.chat(QUESTION, max_tokens=16, temperature=0, adapter="quillo").token_ids
    assert graph_chat.chat(QUESTION, max_tokens=16, temperature=0, adapter="quillo").token_ids == expected
    assert "adapted-ort:quillo" in real_kernel.lifecycle.names()  # a merged variant of its own
    real_kernel.unload("adapted-torch")
    real_kernel.unload("adapted-ort")


def test_a_bad_adapter_is_refused_and_the_base_keeps_serving(real_kernel, adapters, tmp_path):
    from llmk.errors import LlmkError

    chat = real_kernel.load("adapted-bad", source="builtin:smollm2", backend="torch")
    with pytest.raises(LlmkError, match="not a LoRA adapter directory"):
        real_kernel.load("adapted-bad", source="builtin:smollm2", backend="torch", adapters={"x": str(tmp_path)})
    with pytest.raises(OptionsError, match="adapter name"):
        real_kernel.load("adapted-bad", source="builtin:smollm2", backend="torch", adapters={"a:b": str(tmp_path)})
    assert chat.generate("Hello", max_tokens=2).completion_tokens == 2
    real_kernel.unload("adapted-bad")


def test_the_daemon_serves_an_adapter_as_model_name_colon_adapter(adapters, tmp_path):
    """``model: "chat:quillo"`` through the openai client; /v1/models lists it; an adapter
    added through the admin API serves without a new version of the base model."""
    from conftest import ServeProcess, shared_cache_dir

    config = tmp_path / "llmk.yaml"
    config.write_text(json.dumps({"server": {"port": 0, "admin_token_env": "LLMK_TUNE_TOKEN"}, "models": {
        "chat": {"source": "builtin:smollm2", "backend": "torch", "adapters": {"quillo": adapters["quillo"]}}}}))
    daemon = ServeProcess(["--cache-dir", str(shared_cache_dir()), "serve", "--config", str(config)],
                          env={"LLMK_TUNE_TOKEN": "t0ken"})
    try:
        client = daemon.client()
        assert {"chat", "chat:quillo"} <= {m.id for m in client.models.list()}
        answer = client.chat.completions.create(model="chat:quillo", messages=QUESTION, max_tokens=12, temperature=0)
        assert "quillo care" in answer.choices[0].message.content.lower()
        import httpx

        headers = {"Authorization": "Bearer t0ken"}
        before = next(v for v in httpx.get(daemon.url + "/admin/models", headers=headers).json()["data"]
                      if v["name"] == "chat" and v["current"])
        swapped = httpx.put(daemon.url + "/admin/models/chat", headers=headers, timeout=600, json={
            "source": "builtin:smollm2", "backend": "torch", "adapters": adapters})
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["version"] == before["version"]  # the base model was not reloaded
        pirate = client.chat.completions.create(model="chat:pirate", messages=QUESTION, max_tokens=12,
                                                temperature=0)
        assert pirate.choices[0].message.content != answer.choices[0].message.content
        outside = httpx.put(daemon.url + "/admin/models/chat", headers=headers, timeout=60, json={
            "source": "builtin:smollm2", "backend": "torch", "adapters": {"x": str(tmp_path)}})
        assert outside.status_code == 403 and outside.json()["error"]["param"] == "adapters"
    finally:
        daemon.stop()
