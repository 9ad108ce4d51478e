"""One measurement, in a fresh process: ``python worker.py '<job as JSON>'``.

It runs under llmk's Python (llmk, transformers) or the peers' (llama.cpp,
OpenVINO GenAI, onnxruntime-genai), so it imports nothing from llmk at the top
and each engine's library only inside its own class. Every engine is timed
the same way, from outside its API:

- ``load_seconds``: constructing the engine from files already on disk, in a
  process that has imported nothing heavy yet (the cold start a restart pays);
- ``first_token_seconds``: load plus one generated token;
- ``warm_first_token_seconds``: unload, then load and one token again in the
  same process (libraries imported, files in the page cache);
- ``ttft_seconds``: a one-token greedy completion of the prompt on the loaded engine;
- ``decode_tokens_per_s``: (tokens − 1) / (time of the full completion − its TTFT);
- ``peak_rss_bytes``: the process's peak resident memory (``VmHWM``);
- ``perplexity``: on the job's text, where the engine exposes logits (a job of its own).

The result is printed as one ``BENCH-RESULT {...}`` line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


def perplexity(logits_of: Any, ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) in half-overlapping windows, each token scored once
    (the same procedure as ``llmk.generation.Engine.perplexity``)."""
    import numpy as np

    stride = window // 2
    total, count, scored_to, start = 0.0, 0, 1, 0
    while scored_to < len(ids):
        chunk = ids[start:start + window]
        logits = np.asarray(logits_of(chunk), dtype=np.float64)
        first = scored_to - start
        targets = np.array(chunk[first:])
        rows = logits[first - 1:len(chunk) - 1]
        shift = rows.max(axis=-1, keepdims=True)
        logsumexp = np.log(np.exp(rows - shift).sum(axis=-1)) + shift[:, 0]
        total += float((logsumexp - rows[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        scored_to = start + len(chunk)
        start += stride
    return math.exp(total / count)


class Engine:
    """Load once, then ``complete(prompt, n) -> tokens generated``."""

    def __init__(self, job: dict[str, Any]):
        self.job = job

    def load(self) -> None: ...
    def unload(self) -> None: ...
    def complete(self, prompt: str, max_tokens: int) -> int: ...
    def perplexity(self, text: str) -> float | None:
        return None


class Llmk(Engine):
    def load(self) -> None:
        import llmk

        self.kernel = llmk.Kernel(cache_dir=self.job.get("cache_dir"))
        self.model = self.kernel.load("bench", source=self.job["source"], backend=self.job["backend"],
                                      passes=self.job.get("passes", []))

    def unload(self) -> None:
        self.kernel.close()

    def complete(self, prompt: str, max_tokens: int) -> int:
        return self.model.generate(prompt, max_tokens=max_tokens, temperature=0).completion_tokens

    def perplexity(self, text: str) -> float:
        return self.model.perplexity(text)


class Transformers(Engine):
    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmk.sources import load_hf_model

        torch.set_num_threads(self.job["threads"])
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.job["path"])
        self.model = load_hf_model(AutoModelForCausalLM, self.job["path"], dtype=torch.float32).eval()

    def unload(self) -> None:
        del self.model

    def complete(self, prompt: str, max_tokens: int) -> int:
        inputs = self.tokenizer(prompt, return_tensors="pt")
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return out.shape[1] - inputs["input_ids"].shape[1]

    def perplexity(self, text: str) -> float:
        ids = self.tokenizer(text)["input_ids"]
        window = min(1024, self.model.config.max_position_embeddings)
        with self.torch.inference_mode():
            return perplexity(lambda chunk: self.model(self.torch.tensor([chunk])).logits[0].float().numpy(), ids,
                              window)


class LlamaCpp(Engine):
    def load(self) -> None:
        from llama_cpp import Llama
        from llmk_backend_llamacpp.runner import default_model_params_as_llmk

        with default_model_params_as_llmk():  # no AMX buffers, which crash in this llama.cpp
            self.llm = Llama(model_path=self.job["path"], n_ctx=2048, n_threads=self.job["threads"],
                             n_threads_batch=self.job["threads"], logits_all=bool(self.job.get("text")),
                             verbose=False)

    def unload(self) -> None:
        self.llm.close()

    def complete(self, prompt: str, max_tokens: int) -> int:
        self.llm.reset()  # no prompt-prefix reuse between calls: llmk has none either
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return out["usage"]["completion_tokens"]

    def perplexity(self, text: str) -> float:
        import numpy as np

        ids = self.llm.tokenize(text.encode(), add_bos=False, special=False)

        def logits_of(chunk: list[int]) -> Any:
            self.llm.reset()
            self.llm.eval(chunk)
            return np.array(self.llm.scores[:len(chunk)])

        return perplexity(logits_of, ids)


class OpenVinoGenAI(Engine):
    def load(self) -> None:
        import openvino_genai as genai

        self.genai = genai
        self.pipe = genai.LLMPipeline(self.job["path"], "CPU", **self.job.get("properties", {}))

    def unload(self) -> None:
        del self.pipe

    def complete(self, prompt: str, max_tokens: int) -> int:
        config = self.genai.GenerationConfig()
        config.max_new_tokens, config.do_sample = max_tokens, False
        if hasattr(config, "apply_chat_template"):
            config.apply_chat_template = False  # a raw completion, like every other engine here
        return self.pipe.generate([prompt], config).perf_metrics.get_num_generated_tokens()


class OnnxRuntimeGenAI(Engine):
    def load(self) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(self.job["path"])
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)

    def unload(self) -> None:
        del self.tokenizer, self.model

    def complete(self, prompt: str, max_tokens: int) -> int:
        ids = self.tokenizer.encode(prompt)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        return count


ENGINES = {"llmk": Llmk, "transformers": Transformers, "llama.cpp": LlamaCpp, "openvino-genai": OpenVinoGenAI,
           "onnxruntime-genai": OnnxRuntimeGenAI}


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """``job["text"]`` given: only the perplexity on it (llama.cpp computes logits
    for every position then, which would slow its timed runs). Otherwise the timings."""
    engine = ENGINES[job["engine"]](job)
    if job.get("text"):
        engine.load()
        return {"perplexity": engine.perplexity(job["text"])}
    prompt, tokens = job["prompt"], job["tokens"]
    started = time.perf_counter()
    engine.load()
    loaded = time.perf_counter()
    engine.complete(prompt, 1)
    result: dict[str, Any] = {"load_seconds": loaded - started, "first_token_seconds": time.perf_counter() - started}
    begin = time.perf_counter()
    engine.complete(prompt, 1)
    result["ttft_seconds"] = ttft = time.perf_counter() - begin
    begin = time.perf_counter()
    generated = engine.complete(prompt, tokens)
    result["decode_tokens_per_s"] = (generated - 1) / max(time.perf_counter() - begin - ttft, 1e-9)
    result["generated_tokens"] = generated
    engine.unload()
    begin = time.perf_counter()
    engine.load()
    engine.complete(prompt, 1)
    result["warm_first_token_seconds"] = time.perf_counter() - begin
    engine.unload()
    result["peak_rss_bytes"] = peak_rss()
    return result


def peak_rss() -> int:
    """This process's peak resident memory. ``VmHWM``, not ``ru_maxrss``: the
    latter survives ``exec``, so it would report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    print("BENCH-RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
