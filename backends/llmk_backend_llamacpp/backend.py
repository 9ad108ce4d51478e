"""llama.cpp backend: runs GGUF files as they are, through llama-cpp-python's
low-level API (``runner.py``). The artifact is the ``.gguf`` itself: a GGUF
source is never converted, a Hugging Face directory is converted to GGUF once
(``export.py``), and ``quantize`` re-quantizes with llama.cpp's own quantizer."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions, Runner
from llmk.cache import Cache
from llmk.errors import SourceError, UnsupportedError

#: The file inside an export or a pass output; a GGUF source is its own file.
MODEL_FILE = "model.gguf"
#: Bump when the files ``export.py`` writes change for the same input: exports are cached by it.
EXPORT_VERSION = "1"
#: KV cache element types: ggml's type id and bytes per element.
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}
KV_ITEM_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
#: Tokens per micro-batch: llama.cpp's default, its matrix kernels' sweet spot on the CPU. A
#: generating context has this many KV cells beyond the engine's budget (``runner.py``).
UBATCH_TOKENS = 512
#: Resident beyond the mapped file once a model serves, whatever its size, by task: llama.cpp's
#: vocabulary, the core's tokenizer and the context's buffers (``bench/gguf_memory.py``). A
#: decoder at SmolLM2's 49k-token vocabulary 41-52 MB (vocabulary 14 MiB, tokenizer 10-13 MiB),
#: for files of 98 MB to 0.7 GB; MiniLM's encoder (30k WordPiece tokens, no KV cache) 16 MB.
LOAD_OVERHEAD_BYTES = {"generate": 50_000_000, "embed": 20_000_000}


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux's /proc/cpuinfo; elsewhere, no)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_tile" in flags.split()


def uses_extra_buffers(setting: str = "auto") -> bool:
    """``LlamaCppOptions.extra_buffers`` resolved for this machine."""
    return setting == "on" or (setting == "auto" and not cpu_has_amx())


class LlamaCppOptions(BackendOptions):
    #: Threads for decoding and for prompt batches; 0: one per core.
    threads: int = 0
    #: KV cache element type (llama.cpp's default, half the bytes of fp32).
    kv_type: Literal["f32", "f16", "q8_0", "q4_0"] = "f16"
    #: llama.cpp's fused attention kernel (llama-server's default on the CPU). It skips the cells
    #: of other sequences, so a token's logits do not depend on how many come with it in a step:
    #: checking drafts gives what decoding one by one gives (off, they differ by rounding).
    flash_attention: bool = True
    #: Map the weights from the file instead of reading them into memory: pages are
    #: shared with the OS cache and a load costs almost nothing.
    mmap: bool = True
    #: llama.cpp's extra weight layouts on the CPU (AMX tiles, repacked Q4_0/IQ4_NL). ``auto``:
    #: on, except where the CPU has AMX, whose matrix kernel crashes in this llama.cpp
    #: (ggml-org/llama.cpp#20824: a segfault in ``ggml_backend_amx_mul_mat`` on Sapphire Rapids).
    extra_buffers: Literal["auto", "on", "off"] = "auto"
    #: Prefix-cache positions kept once their sequences ended (``null``: as many as the KV budget
    #: holds). Every step's attention spans the unified cache's cells up to the highest one in
    #: use, cached or not, so idle cache slows every step (docs/BENCHMARKS.md, bench/idle_cache.py);
    #: the default keeps about one long prompt. Raise it for longer shared prompts.
    max_cached_tokens: int | None = Field(4096, ge=0)


class LlamaCppBackend(Backend):
    name = "llamacpp"
    artifact_format = "gguf"
    requires = ("llama_cpp",)
    install = "pip install 'llmk[llamacpp]'  # compiles llama.cpp, ~7 min on 2 cores"
    # Weights are mapped from the file, byte for byte; the rest is LOAD_OVERHEAD_BYTES.
    memory_factor: ClassVar[float] = 1.0
    # Highest on the CPU for GGUF sources (no conversion, llama.cpp's own kernels); an HF source
    # must first be converted to GGUF, so the graph backends rank above it there.
    speed_rank: ClassVar[dict[str, int]] = {"cpu": 50, "cuda": 80}
    Options = LlamaCppOptions

    @classmethod
    def rank(cls, device_type: str, source_format: str) -> int:
        rank = cls.speed_rank[device_type]
        return rank if source_format == "gguf" else rank - 45

    @classmethod
    def devices(cls) -> list[str]:
        import llama_cpp

        return ["cuda:0", "cpu"] if llama_cpp.llama_supports_gpu_offload() else ["cpu"]

    @classmethod
    def versions(cls) -> dict[str, str]:
        from importlib.metadata import version

        import llama_cpp

        # The converter's version and the gguf package's: both shape an exported file.
        return {**super().versions(), "llama.cpp": llama_cpp.__version__, "gguf": version("gguf"),
                "llmk-gguf-export": EXPORT_VERSION}

    def export(self, source: Artifact, out_dir: Path, *, dtype: str) -> None:
        from llmk_backend_llamacpp.export import export_gguf

        export_gguf(source, out_dir / MODEL_FILE, dtype=dtype)

    def estimate_memory(self, artifact: Artifact, *, device: str, dtype: str, options: LlamaCppOptions) -> int:
        extra_cells = 0
        if artifact.task == "generate":  # the micro-batch of cells beyond the engine's KV budget
            extra_cells = UBATCH_TOKENS * self.kv_bytes_per_token(artifact.tokenizer_dir, dtype=dtype, options=options)
        weights = int(gguf_file(artifact).stat().st_size * self.memory_factor)
        return weights + LOAD_OVERHEAD_BYTES[artifact.task] + extra_cells

    def kv_bytes_per_token(self, config_dir: Path, *, dtype: str, options: LlamaCppOptions) -> int:
        from llmk.kv import config_bytes_per_token

        return int(config_bytes_per_token(config_dir, "fp32") / 4 * KV_ITEM_BYTES[options.kv_type])

    def load(self, artifact: Artifact, *, device: str, dtype: str, options: LlamaCppOptions,
             cache: Cache) -> Runner:
        from llmk_backend_llamacpp.runner import LlamaCppEncoderRunner, LlamaCppRunner, load_model

        if dtype not in ("fp32", "fp16", "bf16"):
            raise UnsupportedError(f"llamacpp computes in the GGUF's own types; dtype {dtype!r} means nothing to it")
        path = gguf_file(artifact)
        model = load_model(artifact.source, path, device, options)
        if artifact.task == "generate":
            return LlamaCppRunner(model, path, device, options)
        return LlamaCppEncoderRunner(model, path, device, options)


def gguf_file(artifact: Artifact) -> Path:
    """The artifact's ``.gguf``: a source is the file itself, a built artifact a directory holding it."""
    path = artifact.path / MODEL_FILE if artifact.path.is_dir() else artifact.path
    if not path.is_file():
        raise SourceError(artifact.source, f"no GGUF file at {path}")
    return path
