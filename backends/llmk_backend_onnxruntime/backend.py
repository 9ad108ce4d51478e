"""ONNX Runtime backend: models exported to ONNX with their KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions, Runner
from llmk.cache import Cache, key_digest
from llmk.errors import SourceError

MODEL_FILE = "model.onnx"


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
    # 1.1x the graph's size in fp32, 1.75x for MatMulNBits int8 (prepacked; measured on SmolLM2).
    memory_factor: ClassVar[float] = 1.9
    speed_rank: ClassVar[dict[str, int]] = {"cpu": 20, "cuda": 90}
    Options = OnnxRuntimeOptions

    @classmethod
    def devices(cls) -> list[str]:
        import onnxruntime

        cuda = ["cuda:0"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else []
        return [*cuda, "cpu"]

    @classmethod
    def versions(cls) -> dict[str, str]:
        from llmk_backend_torch.backend import export_versions

        return {**super().versions(), **export_versions()}

    def export(self, source: Artifact, out_dir: Path, *, dtype: str) -> None:
        from llmk_backend_onnxruntime.export import export_onnx

        export_onnx(source, out_dir / MODEL_FILE, dtype=dtype)

    def load(self, artifact: Artifact, *, device: str, dtype: str, options: OnnxRuntimeOptions,
             cache: Cache) -> Runner:
        from llmk_backend_onnxruntime.runner import OnnxRuntimeRunner, make_session, save_optimized

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
            raise SourceError(artifact.source, f"cannot load {path}: {error}") from error
        return OnnxRuntimeRunner(session, artifact, device)
