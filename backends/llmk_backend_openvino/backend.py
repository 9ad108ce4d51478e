"""OpenVINO backend: models converted to OpenVINO IR; decoders run OpenVINO's paged attention."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions, Runner
from llmk.cache import Cache, key_digest
from llmk.errors import SourceError

MODEL_FILE = "model.xml"


class OpenVINOOptions(BackendOptions):
    #: OpenVINO's CPU plugin tuning: "latency" for one stream, "throughput" for many.
    performance_hint: Literal["latency", "throughput"] = "latency"
    #: Inference threads; 0 lets OpenVINO decide.
    threads: int = 0
    #: Keep the compiled model in the kernel's cache so that later loads skip compiling
    #: (encoders only: OpenVINO cannot import a compiled paged decoder back).
    compile_cache: bool = True


class OpenVINOBackend(Backend):
    name = "openvino"
    artifact_format = "openvino"
    requires = ("openvino",)
    install = "pip install 'llmk[openvino]'"
    # The compiled model keeps its own (repacked) weights beside the memory-mapped IR:
    # 2.1x the IR's size in fp32, 2.6x for int8 (measured on SmolLM2).
    memory_factor: ClassVar[float] = 2.8
    speed_rank: ClassVar[dict[str, int]] = {"cpu": 20}
    Options = OpenVINOOptions

    @classmethod
    def versions(cls) -> dict[str, str]:
        from llmk_backend_torch.backend import export_versions

        return {**super().versions(), **export_versions()}

    def export(self, source: Artifact, out_dir: Path, *, dtype: str) -> None:
        from llmk_backend_openvino.export import convert

        convert(source, out_dir / MODEL_FILE, dtype=dtype)

    def load(self, artifact: Artifact, *, device: str, dtype: str, options: OpenVINOOptions,
             cache: Cache) -> Runner:
        from llmk_backend_openvino.runner import OpenVINORunner, compile_model, compile_paged

        path = artifact.path / MODEL_FILE
        try:
            if artifact.task == "generate":
                compiled = compile_paged(path, dtype, options)
            elif options.compile_cache:
                # Compiling for the CPU takes seconds: OpenVINO's own model cache keeps
                # the compiled graph (weights stay memory-mapped from the IR).
                key = key_digest(artifact.digest, dtype, options.model_dump(), self.versions())
                blobs = cache.build("runtime", f"openvino-{key}", lambda out: compile_model(path, dtype, options, out),
                                    describe="compiled OpenVINO model")
                compiled = compile_model(path, dtype, options, blobs)
            else:
                compiled = compile_model(path, dtype, options)
        except Exception as error:  # openvino raises RuntimeError for anything
            raise SourceError(artifact.source, f"cannot load {path}: {error}") from error
        return OpenVINORunner(compiled, artifact, device)
