"""Memory of a GGUF model on the llamacpp backend, against its file size (issue 15's
goal: at most 1.2x).

    python bench/gguf_memory.py [--model SOURCE]... [--synthetic SHAPE]... [--runs 2]

A row is the process's growth over a load, its warm-up and a 4-token request (imports
and caches warmed by a load before), less the KV cells llama.cpp allocated: llama.cpp
writes its whole cache at creation, and its size follows the configured context, not
the model. Each row runs in a process of its own; the median of ``--runs`` is printed.

``--synthetic SHAPE`` measures a llama-architecture model of a bigger published shape
(``smollm2-360m``, ``llama-1b``) with random weights and SmolLM2's tokenizer, quantized
to SmolLM2's file type (``quantize:gguf_type=Q4_1``): what a load costs does not depend
on the weights' values, and no model hub is reachable here. It is written once under
the kernel's cache directory (``bench/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Published shapes (hidden, intermediate, layers, heads, KV heads) on SmolLM2's vocabulary.
SHAPES = {
    "smollm2-360m": (960, 2560, 32, 15, 5),
    "llama-1b": (2048, 8192, 16, 32, 8),  # Llama 3.2 1B
}


def write_synthetic(shape: str, cache_root: Path) -> Path:
    """A Hugging Face llama directory of ``shape``: fp16 random weights, SmolLM2's tokenizer."""
    import numpy as np
    from safetensors.numpy import save_file

    import llmk
    from llmk.sources import resolve_source

    out = cache_root / "bench" / f"random-{shape}"
    if (out / "model.safetensors").is_file():
        return out
    with llmk.Kernel(autoload=False) as kernel:
        tokenizer_dir = resolve_source("builtin:smollm2", kernel.cache).tokenizer_dir
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, tmp / name)
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    config = json.loads((tokenizer_dir / "config.json").read_text())
    head_dim = hidden // heads
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  torch_dtype="float16", _model_name_or_path=f"random {shape}")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(0)

    def weight(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": weight(config["vocab_size"], hidden),
               "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": weight(intermediate, hidden),
            p + "mlp.up_proj.weight": weight(intermediate, hidden),
            p + "mlp.down_proj.weight": weight(hidden, intermediate),
            p + "input_layernorm.weight": np.ones(hidden, np.float16),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float16),
        }
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def measure(source: str, passes: list[str]) -> dict:
    from llmk_backend_llamacpp.backend import gguf_file
    from memory import load_growth  # bench/memory.py: the same measurement, per backend

    def cells_and_file(model: Any) -> dict:
        runner = model.version.engine.runner
        kv = runner.kv_cells * runner.kv_layout.bytes_per_token if runner.kv_layout else 0  # encoders: none
        return {"kv": kv,
                "file": gguf_file(model.version.artifact).stat().st_size}

    found = load_growth(source, "llamacpp", passes, cells_and_file)
    return {**found, "ratio": (found["grew"] - found["kv"]) / found["file"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", dest="models", action="append", default=[])
    parser.add_argument("--synthetic", action="append", default=[], choices=sorted(SHAPES))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--row", nargs=2, metavar=("SOURCE", "PASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # one measurement, in this process
        source, passes = args.row
        print(json.dumps(measure(source, [p for p in passes.split(" ") if p])))
        return 0

    rows = [(source, source, []) for source in args.models or ([] if args.synthetic else ["builtin:smollm2"])]
    if args.synthetic:
        import llmk

        with llmk.Kernel(autoload=False) as kernel:
            root = kernel.cache.root
        rows += [(f"{shape} (random weights)", str(write_synthetic(shape, root)), ["quantize:gguf_type=Q4_1"])
                 for shape in args.synthetic]
    flags = [f"--model {m}" for m in args.models] + [f"--synthetic {s}" for s in args.synthetic]
    print(f"Command: `python bench/gguf_memory.py {' '.join(flags + [f'--runs {args.runs}'])}`\n")
    print("| model | passes | file MB | process grew MB | KV cells MB | grew less KV ÷ file (runs) |")
    print("|---|---|---|---|---|---|")
    for label, source, passes in rows:
        results = []
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, __file__, "--row", source, " ".join(passes)],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        ratios = [r["ratio"] for r in results]
        r = results[0]
        print(f"| {label} | {' '.join(passes) or 'none'} | {r['file'] / 1e6:.1f} | "
              f"{statistics.median(x['grew'] for x in results) / 1e6:.0f} | {r['kv'] / 1e6:.1f} | "
              f"**{statistics.median(ratios):.2f}×** ({', '.join(f'{x:.2f}' for x in ratios)}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
