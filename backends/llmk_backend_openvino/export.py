"""Convert a Hugging Face model to OpenVINO IR: a decoder with a stateful KV cache.

The decoder is converted from PyTorch with its KV cache as explicit inputs and
outputs (``llmk_backend_torch.export``), then each ``past``/``present`` pair is
turned into internal model state, with a ``beam_idx`` input gathering the state's
rows: optimum-intel's stateful form. It is what OpenVINO's SDPA→PagedAttention
transformation requires as input (it refuses a model without state) and what
OpenVINO GenAI reads; the runner applies that transformation when it loads the
model (``paged.py``), so the state itself is never used by llmk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmk.artifact import Artifact
from llmk.logs import get_logger
from llmk.progress import stages

log = get_logger("llmk.backend.openvino")


def convert(source: Artifact, path: Path, *, dtype: str) -> None:
    import openvino as ov
    from llmk_backend_torch.export import example_inputs, io_names, load_for_export

    log.info("export.started", backend="openvino", source=source.source, dtype=dtype)
    with stages(f"llmk: converting {source.source} to OpenVINO IR (once)", ["load", "convert", "save"]) as stage:
        stage("load")
        wrapper = load_for_export(source.path, source.task, dtype)
        inputs, outputs = io_names(wrapper)
        example = example_inputs(wrapper)
        stage("convert")
        args = tuple(example[n] for n in ("input_ids", "attention_mask", "position_ids", "past") if n in example)
        model = ov.convert_model(wrapper, example_input=args)
        for port, name in zip(model.inputs, inputs, strict=True):
            port.get_tensor().set_names({name})
        for port, name in zip(model.outputs, outputs, strict=True):
            port.get_tensor().set_names({name})
        if source.task == "generate":
            make_stateful(model, [n for n in inputs if n.startswith("past.")],
                          [n for n in outputs if n.startswith("present.")])
        stage("save")
        ov.save_model(model, str(path), compress_to_fp16=(dtype == "fp16"))
    config = wrapper.model.config
    (path.parent / "llmk-openvino.json").write_text(json.dumps({
        "task": source.task,
        "max_context": int(getattr(config, "max_position_embeddings", 2048) or 2048),
    }, indent=1))


def make_stateful(model, past_names: list[str], present_names: list[str]) -> None:  # noqa: ANN001 - ov.Model
    import openvino as ov
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    batch = model.input("input_ids").get_partial_shape()[0]
    beam_idx = opset13.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([batch]))
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    model.add_parameters([beam_idx])
    for name in past_names:
        port = model.input(name)
        consumers = port.get_target_inputs()
        gather = opset13.gather(port, beam_idx, opset13.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(gather.output(0))
    model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(model, dict(zip(past_names, present_names, strict=True)))
    # A reset state starts as zeros of shape [batch of input_ids, kv_heads, 0, head_dim].
    input_ids = model.input("input_ids")
    batch_size = opset13.gather(opset13.shape_of(input_ids, output_type="i64"), opset13.constant([0]),
                                opset13.constant(0))
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [dim.min_length for dim in op.get_output_partial_shape(0)]
            dims[0] = batch_size
            parts = [opset13.constant(np.array([d], dtype=np.int64)) if isinstance(d, int) else d for d in dims]
            zeros = opset13.broadcast(opset13.constant(0.0, dtype=op.get_output_element_type(0)),
                                      opset13.concat(parts, axis=0))
            op.set_arguments([zeros])
    model.validate_nodes_and_infer_types()
