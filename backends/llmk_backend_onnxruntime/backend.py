"""ONNX Runtime backend: decoders as llmk's own GroupQueryAttention graph on KV
buffers updated in place (the step contract), encoders as a dynamo export."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions, Runner
from llmk.cache import Cache, key_digest
from llmk.errors import BackendUnavailableError, SourceError, UnsupportedError

MODEL_FILE = "model.onnx"
#: Bump when the decoder graph ``builder.py`` writes changes: it is part of every export's cache key.
GRAPH_VERSION = "1"


class OnnxRuntimeOptions(BackendOptions):
    #: ORT graph optimizations applied when the session is created.
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    #: Intra-op threads; 0 lets ONNX Runtime decide (one per physical core).
    threads: int = 0


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    artifact_format = "onnx"
    requires = ("onnxruntime", "onnx", "onnxscript")
    install = "pip install 'llmk[onnxruntime]'"
    # Resident after a few steps, per byte of graph files (SmolLM2, KV cache apart): 0.85x in fp32
    # (the embedding table's pages are mapped, not read), 1.5x int8, 1.75x int4 (prepacked weights).
    memory_factor: ClassVar[float] = 1.9
    speed_rank: ClassVar[dict[str, int]] = {"cpu": 30, "cuda": 90}
    Options = OnnxRuntimeOptions

    @classmethod
    def devices(cls) -> list[str]:
        import onnxruntime

        cuda = ["cuda:0"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else []
        return [*cuda, "cpu"]

    @classmethod
    def versions(cls) -> dict[str, str]:
        from llmk_backend_torch.backend import export_versions

        return {**super().versions(), **export_versions(), "llmk-onnx-graph": GRAPH_VERSION}

    def export(self, source: Artifact, out_dir: Path, *, dtype: str) -> None:
        from llmk_backend_onnxruntime.export import export_onnx

        export_onnx(source, out_dir / MODEL_FILE, dtype=dtype)

    def load(self, artifact: Artifact, *, device: str, dtype: str, options: OnnxRuntimeOptions,
             cache: Cache) -> Runner:
        from llmk_backend_onnxruntime.runner import OnnxEncoderRunner, OnnxRuntimeRunner, make_session, save_optimized

        if artifact.task == "generate":
            # GroupQueryAttention has float kernels on the CPU and fp16/bf16 ones on CUDA only.
            if device.startswith("cuda") and dtype == "fp32":
                raise UnsupportedError("onnxruntime generates in fp16 or bf16 on CUDA (its attention has no fp32 "
                                       "kernel there); use dtype fp16 or bf16")
            if not device.startswith("cuda") and dtype == "bf16":
                raise UnsupportedError("onnxruntime generates in fp32 (or fp16) on the CPU; use dtype fp32")
        path = artifact.path / MODEL_FILE
        try:
            if device == "cpu" and options.graph_optimization != "disable":
                # Optimizing a graph takes seconds; do it once and load the result as is.
                key = key_digest(artifact.digest, options.graph_optimization, self.versions())
                optimized = cache.build("runtime", f"onnxruntime-{key}",
                                        lambda out: save_optimized(path, out / MODEL_FILE, options.graph_optimization),
                                        describe="optimized ONNX Runtime graph")
                session = make_session(optimized / MODEL_FILE, device, options.model_copy(
                    update={"graph_optimization": "disable"}))
            else:
                session = make_session(path, device, options)
        except Exception as error:  # onnxruntime raises its own untyped errors
            if artifact.task == "generate" and not _attention_takes_chunks():
                raise BackendUnavailableError(self.name, "this onnxruntime's GroupQueryAttention has no "
                                              "query_seqlens input, which the decoder graph needs",
                                              "pip install -U onnxruntime") from error
            raise SourceError(artifact.source, f"cannot load {path}: {error}") from error
        if artifact.task == "generate":
            return OnnxRuntimeRunner(session, artifact, device)
        return OnnxEncoderRunner(session, artifact, device)


def _attention_takes_chunks() -> bool:
    """Whether GroupQueryAttention takes right-padded chunks (``query_seqlens``); read
    only when a session fails, since listing the schemas takes a third of a second."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    return any(i.name == "query_seqlens" for s in C.get_all_operator_schema()
               if s.name == "GroupQueryAttention" for i in s.inputs)
