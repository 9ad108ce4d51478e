"""Export a Hugging Face model to ONNX: decoders through llmk's own graph builder
(``builder.py``), encoders with the dynamo exporter."""

from __future__ import annotations

import json
from pathlib import Path

from llmk.artifact import Artifact
from llmk.logs import get_logger
from llmk.progress import stages

log = get_logger("llmk.backend.onnxruntime")


#: Written beside ``model.onnx``: what the runner needs to know about the graph.
META_FILE = "llmk-onnx.json"


def export_onnx(source: Artifact, path: Path, *, dtype: str) -> None:
    if source.task == "generate":
        export_decoder(source, path, dtype=dtype)
    else:
        export_encoder(source, path, dtype=dtype)


def export_decoder(source: Artifact, path: Path, *, dtype: str) -> None:
    from llmk_backend_onnxruntime.builder import build_decoder

    log.info("export.started", backend="onnxruntime", source=source.source, dtype=dtype, graph="decoder")
    with stages(f"llmk: building the ONNX graph of {source.source} (once)", ["build"]) as stage:
        stage("build")
        config = build_decoder(source.path, path, dtype=dtype)
    (path.parent / META_FILE).write_text(json.dumps({
        "task": source.task,
        "graph": "decoder",
        "dtype": dtype,
        "max_context": config.max_context,
        "layers": config.layers,
        "kv_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "vocab": config.vocab,
    }, indent=1))


def export_encoder(source: Artifact, path: Path, *, dtype: str) -> None:
    import torch
    from llmk_backend_torch.export import dynamic_shapes, example_inputs, io_names, load_for_export

    log.info("export.started", backend="onnxruntime", source=source.source, dtype=dtype)
    with stages(f"llmk: exporting {source.source} to ONNX (once)", ["load", "capture graph", "save"]) as stage:
        stage("load")
        wrapper = load_for_export(source.path, source.task, dtype)
        inputs, outputs = io_names(wrapper)
        stage("capture graph")
        program = torch.onnx.export(
            wrapper,
            kwargs=example_inputs(wrapper),
            dynamic_shapes=dynamic_shapes(wrapper),
            input_names=inputs,
            output_names=outputs,
            dynamo=True,
            verbose=False,
        )
        stage("save")
        program.save(str(path), external_data=True)
    config = wrapper.model.config
    (path.parent / META_FILE).write_text(json.dumps({
        "task": source.task,
        "graph": "encoder",
        "max_context": int(getattr(config, "max_position_embeddings", 2048) or 2048),
        "inputs": inputs,
        "outputs": outputs,
    }, indent=1))


def save_onnx(model, path: Path) -> None:  # noqa: ANN001 - onnx.ModelProto
    """Save ``model`` with its large tensors in ``<name>.data`` beside it.

    (``onnx.save_model(save_as_external_data=True)`` refuses when a file of that
    name exists in the *current* directory; this writes relative to ``path``.)
    """
    import onnx
    from onnx.external_data_helper import set_external_data, write_external_data_tensors

    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
            set_external_data(tensor, path.name + ".data")
    onnx.save_model(write_external_data_tensors(model, str(path.parent)), str(path))
