"""The peers ``llmk bench`` measures llmk against, and the model files each one
reads: the very files llmk serves, wherever the peer can read them.

| peer | runs | on |
|---|---|---|
| transformers | ``generate`` (the baseline) | the Hugging Face checkpoint llmk converted (fp32) |
| llama.cpp | llama-cpp-python; for serving, llama.cpp's own ``llama-server`` | the GGUF file itself (Q4_1) |
| openvino-genai | ``LLMPipeline``, with llmk's settings and its own | the IR of each openvino pipeline |
| onnxruntime-genai | ``Generator`` | the ONNX graph of each onnxruntime pipeline |

transformers runs in llmk's own environment; the others in the peers'
(``bench/setup_peers.sh``), which llmk never imports. ``llama-server`` is a
binary the same script builds into that environment (``bin/llama-server``) from
the llama.cpp source that llama-cpp-python vendors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmk.cache import Cache, key_digest

#: What each peer imports, and the distribution whose version the report names.
PEERS = {
    "transformers": ("transformers", "transformers"),
    "llama.cpp": ("llama_cpp", "llama-cpp-python"),
    "openvino-genai": ("openvino_genai", "openvino-genai"),
    "onnxruntime-genai": ("onnxruntime_genai", "onnxruntime-genai"),
}
#: The llmk backend whose artifacts a peer reads, for peers that follow a pipeline.
FOLLOWS = {"openvino-genai": "openvino", "onnxruntime-genai": "onnxruntime"}
DEFAULT_PEERS_PYTHON = Path(".venv-peers/bin/python")


@dataclass(frozen=True)
class PeerEnv:
    """Where each peer runs, and the versions found there."""

    pythons: dict[str, str]  # peer -> interpreter
    versions: dict[str, str]  # distribution -> version
    llama_server: str | None = None  # llama.cpp's server binary, when llama.cpp is wanted and built

    @classmethod
    def find(cls, wanted: list[str], peers_python: str | None) -> PeerEnv:
        pythons, versions = {}, {}
        candidates = [sys.executable] + ([peers_python] if peers_python and Path(peers_python).exists() else [])
        for peer in wanted:
            module, distribution = PEERS[peer]
            for python in candidates if peer == "transformers" else candidates[1:]:
                found = _version(python, module, distribution)
                if found:
                    pythons[peer], versions[distribution] = python, found
                    break
        server = llama_server_binary(peers_python) if "llama.cpp" in wanted and peers_python else None
        if server:
            versions["llama-server"] = llama_server_version(server)
        return cls(pythons, versions, str(server) if server else None)


def _version(python: str, module: str, distribution: str) -> str | None:
    code = (f"import importlib.util, importlib.metadata as m\n"
            f"print(m.version({distribution!r}) if importlib.util.find_spec({module!r}) else '')")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or None


def llama_server_binary(peers_python: str) -> Path | None:
    """``llama-server`` beside the peers' interpreter (``bench/setup_peers.sh`` builds it there)."""
    binary = Path(peers_python).parent / "llama-server"
    return binary if binary.is_file() else None


def llama_server_version(binary: Path) -> str:
    """Its ``--version`` line, and the llama-cpp-python sdist it was built from
    (``llama-server.source`` at the environment's root)."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"version: (.+)", done.stdout + done.stderr)
    stamp = binary.parent.parent / "llama-server.source"
    built = stamp.read_text().strip().replace("==", " ") if stamp.is_file() else ""
    return ", ".join(filter(None, [found.group(1) if found else "", f"from {built}" if built else ""])) or "unknown"


def gguf_file(source: str) -> Path | None:
    """The GGUF file behind ``source``, if it has one."""
    if source.lower().endswith(".gguf"):
        return Path(source).expanduser()
    if source.startswith("builtin:"):
        import importlib.util

        from llmk.sources import BUILTINS

        builtin = BUILTINS.get(source.split(":", 1)[1])
        spec = importlib.util.find_spec(builtin.package) if builtin else None
        if builtin and spec and spec.submodule_search_locations and builtin.relpath.endswith(".gguf"):
            return Path(next(iter(spec.submodule_search_locations))) / builtin.relpath
    return None


def openvino_settings() -> dict[str, str]:
    """The properties llmk's openvino backend compiles with (fp32), as strings."""
    from llmk_backend_openvino.backend import OpenVINOOptions
    from llmk_backend_openvino.runner import compile_config

    return {k: str(v) for k, v in compile_config("fp32", OpenVINOOptions()).items()}


def _link_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            (out / name).symlink_to((tokenizer_dir / name).resolve())


def openvino_genai_dir(cache: Cache, ir_dir: Path, tokenizer_dir: Path, python: str) -> Path:
    """A folder LLMPipeline reads: llmk's IR (linked, not copied), the tokenizer
    converted to OpenVINO models (by openvino-tokenizers, in the peers' environment)
    and the Hugging Face configs."""
    def build(out: Path) -> None:
        (out / "openvino_model.xml").symlink_to((ir_dir / "model.xml").resolve())
        (out / "openvino_model.bin").symlink_to((ir_dir / "model.bin").resolve())
        _link_tokenizer(tokenizer_dir, out)
        code = ("import sys, openvino as ov\nfrom openvino_tokenizers import convert_tokenizer\n"
                "from transformers import AutoTokenizer\n"
                "tok, detok = convert_tokenizer(AutoTokenizer.from_pretrained(sys.argv[1]), with_detokenizer=True)\n"
                "ov.save_model(tok, sys.argv[2] + '/openvino_tokenizer.xml')\n"
                "ov.save_model(detok, sys.argv[2] + '/openvino_detokenizer.xml')\n")
        subprocess.run([python, "-c", code, str(tokenizer_dir), str(out)], check=True, capture_output=True,
                       text=True, timeout=600)

    return cache.build("bench", f"openvino-genai-{key_digest(str(ir_dir.resolve()))}", build,
                       describe="the OpenVINO GenAI folder")


def onnxruntime_genai_dir(cache: Cache, onnx_dir: Path, tokenizer_dir: Path) -> Path:
    """A folder onnxruntime-genai reads: llmk's graph (linked) and a
    ``genai_config.json`` naming its inputs and outputs."""
    def build(out: Path) -> None:
        for name in ("model.onnx", "model.onnx.data"):
            if (onnx_dir / name).exists():
                (out / name).symlink_to((onnx_dir / name).resolve())
        _link_tokenizer(tokenizer_dir, out)
        (out / "genai_config.json").write_text(json.dumps(genai_config(tokenizer_dir), indent=1))

    return cache.build("bench", f"onnxruntime-genai-{key_digest(str(onnx_dir.resolve()))}", build,
                       describe="the onnxruntime-genai folder")


def genai_config(tokenizer_dir: Path) -> dict[str, Any]:
    config = json.loads((tokenizer_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    eos = config.get("eos_token_id", 0)
    return {
        "model": {
            "type": config.get("model_type", "llama"),
            "bos_token_id": config.get("bos_token_id", 0),
            "eos_token_id": eos,
            "pad_token_id": config.get("pad_token_id") or (eos if isinstance(eos, int) else eos[0]),
            "vocab_size": config["vocab_size"],
            "context_length": config.get("max_position_embeddings", 2048),
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": config.get("head_dim") or config["hidden_size"] // heads,
                "hidden_size": config["hidden_size"],
                "num_attention_heads": heads,
                "num_key_value_heads": config.get("num_key_value_heads", heads),
                "num_hidden_layers": config["num_hidden_layers"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past.%d.key",
                           "past_value_names": "past.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": config.get("max_position_embeddings", 2048),
                   "past_present_share_buffer": False},
    }


#: llama-cpp-python's greedy loop (its sampler chain in C) on a GGUF and given token ids, decode
#: only, as its users run it (2 threads, flash attention), in a process of its own: two threads
#: calling llama.cpp's OpenMP build in one process slow each other down
#: (``llmk_backend_llamacpp.runner.on_compute_thread``). Its model loads as llmk's does
#: (``default_model_params_as_llmk``: no AMX buffers, which crash in this llama.cpp).
_LLAMA_CPP_PYTHON_DECODE = """
import json, sys, time
import llama_cpp
from llmk_backend_llamacpp.runner import default_model_params_as_llmk
path, ids, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
with default_model_params_as_llmk():
    llama = llama_cpp.Llama(path, n_ctx=max(2048, len(ids) + tokens), n_threads=2, n_threads_batch=2,
                            flash_attn=True, verbose=False)
produced, first = 0, time.perf_counter()
for token in llama.generate(ids, temp=0.0, top_k=1):
    produced += 1
    if produced == 1:
        first = time.perf_counter()
    if produced == tokens or token == llama.token_eos():
        break
print((produced - 1) / (time.perf_counter() - first))
"""


def llama_cpp_python_decode_rate(gguf: str | Path, ids: list[int], tokens: int, python: str | None = None) -> float:
    """Decode tokens/s (after the first token) of llama-cpp-python on ``gguf``, greedy, in a fresh process."""
    done = subprocess.run([python or sys.executable, "-c", _LLAMA_CPP_PYTHON_DECODE, str(gguf), json.dumps(ids),
                           str(tokens)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])
