"""The paged form of a decoder, built from its stateful IR when the model loads.

OpenVINO's SDPA→PagedAttention transformation (what OpenVINO GenAI's continuous
batching runs) turns the stateful decoder into one that takes a flat run of tokens
from any number of sequences and keeps their keys and values in blocks of
caller-owned cache tensors:

- ``input_ids``, ``position_ids`` ``[tokens]`` (int64): every sequence's new tokens, one after another;
- ``past_lens`` ``[sequences]`` (int32): positions already cached, per sequence;
- ``subsequence_begins`` ``[sequences + 1]`` (int32): where each sequence's tokens start in ``input_ids``;
- ``block_indices`` (int32): the block tables, one after another, and ``block_indices_begins``
  ``[sequences + 1]`` (int32) where each starts;
- ``max_context_len`` (int32 scalar): the longest ``past + new`` of the call;
- ``key_cache.N``, ``value_cache.N`` ``[blocks, kv_heads, block_size, head_dim]``: written in place.

A ``Gather`` driven by ``logits_rows`` ``[rows]`` (int64 indices into the flat run)
is added before the output head, so that a 256-token prompt chunk costs one row of
logits, not 256: ``logits`` is ``[rows, vocab]``.

Why at load time rather than saved (OpenVINO 2026.4): its IR reader cannot read the
``PagedAttentionExtension`` op back ("unsupported opset: extension"); its CPU plugin
cannot import a compiled paged model either (the op's runtime info is not
serialized, and on SmolLM2 a constant comes back with size 0), so OpenVINO's model
cache silently recompiles; and OpenVINO GenAI (``llmk bench``'s peer) reads the
stateful IR itself. The transformation takes 0.3 s on SmolLM2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmk.errors import UnsupportedError

#: The input that picks the rows of the flat token run to compute logits for.
LOGITS_ROWS = "logits_rows"


def read_paged(path: Path, core: Any) -> Any:  # ov.Core -> ov.Model
    """The stateful decoder IR at ``path``, transformed for paged attention."""
    from openvino._offline_transformations import paged_attention_transformation

    model = core.read_model(str(path))
    paged_attention_transformation(model)
    gather_logits_rows(model)
    return model


def gather_logits_rows(model: Any) -> None:
    """Feed the output head only the hidden states of the rows named by ``logits_rows``."""
    import openvino as ov
    from openvino import opset13 as ops

    head = model.output("logits").get_node().input_value(0).get_node()
    while head.get_type_name() == "Convert":
        head = head.input_value(0).get_node()
    if head.get_type_name() != "MatMul":
        raise UnsupportedError(f"openvino: the logits do not come from a MatMul (found {head.get_type_name()})")
    hidden = head.input_value(0)
    width = hidden.get_partial_shape()[-1]
    if width.is_dynamic:
        raise UnsupportedError("openvino: the hidden size before the output head is not static")
    rows = ops.parameter(ov.PartialShape([-1]), ov.Type.i64, name=LOGITS_ROWS)
    rows.output(0).get_tensor().set_names({LOGITS_ROWS})
    # [tokens, 1, hidden] -> [tokens, hidden]: the paged graph's "batch" is its flat run of tokens.
    flat = ops.reshape(hidden, ops.constant(np.array([-1, width.get_length()], np.int64)), special_zero=False)
    head.input(0).replace_source_output(ops.gather(flat, rows, ops.constant(0)).output(0))
    model.add_parameters([rows])
    model.validate_nodes_and_infer_types()
