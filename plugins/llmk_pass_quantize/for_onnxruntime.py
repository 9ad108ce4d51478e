"""quantize on ONNX: weight-only ``MatMulNBits`` (or ORT's dynamic quantization, lossy).

The graph is rewritten here rather than by ONNX Runtime's ``MatMulNBitsQuantizer``
because that one has two losses this avoids (measured on SmolLM2, int4):

- its int4 zero point is an integer, which cannot land on a float-minimum grid
  (+16% perplexity). Here int4 keeps a float minimum, as a correction term:
  ``x @ (q·d + m) = MatMulNBits(x; q, d, zero 0) + blocksum(x) @ m``.
- it quantizes the output head to int4 (+10%) and has no 8-bit form of the
  embedding lookup. Here the embedding table is stored once, in 8 bits (groups
  of 32, symmetric: GGUF's Q8_0 grid), and serves both the lookup and — when the
  head is tied to it, as in most small models — the output projection.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llmk.artifact import Artifact
from llmk_pass_quantize.grids import asymmetric_uint4, pack_uint4, symmetric_int8
from llmk_pass_quantize.optimizer import QuantizeOptions

MODEL_FILE = "model.onnx"
MS_DOMAIN = "com.microsoft"
INPUT_IDS = "input_ids"  # the embedding lookup is the Gather on this graph input
#: The embedding table and the output head: 8 bits in groups of 32, always.
TABLE_GROUP = 32


def quantize(artifact: Artifact, out_dir: Path, options: QuantizeOptions) -> None:
    import onnx
    from llmk_backend_onnxruntime.export import save_onnx
    from llmk_backend_onnxruntime.runner import save_optimized

    # The exported graph feeds weights through Transpose nodes; ONNX Runtime's basic
    # (hardware-independent) optimizations fold them into constant initializers.
    folded = out_dir / "folded" / MODEL_FILE
    folded.parent.mkdir()
    save_optimized(artifact.path / MODEL_FILE, folded, "basic")
    target = out_dir / MODEL_FILE
    if options.activations:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(folded), str(target), weight_type=QuantType.QInt8, use_external_data_format=True)
    else:
        model = onnx.load(str(folded))
        _Rewriter(model, options).run()
        save_onnx(model, target)
    shutil.rmtree(folded.parent)
    for file in artifact.path.glob("*.json"):
        if not file.name.startswith("llmk-manifest"):
            shutil.copy(file, out_dir / file.name)


class _Rewriter:
    """Replaces float ``MatMul``/``Gather`` weights in one pass over the graph."""

    def __init__(self, model: Any, options: QuantizeOptions):
        from onnx import numpy_helper

        self.model, self.options = model, options
        self.graph = model.graph
        self.weights = {t.name: t for t in self.graph.initializer
                        if len(t.dims) == 2 and t.data_type == 1}  # 2-D float32
        self.array = lambda name: numpy_helper.to_array(self.weights[name])
        self.new_initializers: list[Any] = []
        self.block_sums: dict[tuple[str, int], str] = {}  # (input, group) -> its block sums, computed once
        self.table: tuple[str, str, np.ndarray] | None = None  # the 8-bit embedding: (data, scales, float table)
        self.dropped: set[str] = set()
        self.count = 0

    def run(self) -> None:
        embedding = next((n for n in self.graph.node if n.op_type == "Gather" and n.input[0] in self.weights
                          and n.input[1] == INPUT_IDS), None)
        vocab = self.weights[embedding.input[0]].dims[0] if embedding is not None else None
        nodes: list[Any] = []
        for node in self.graph.node:
            if node is embedding:
                nodes += self._gather(node)
            elif node.op_type == "MatMul" and node.input[1] in self.weights:
                k, n = self.weights[node.input[1]].dims
                if vocab is not None and n == vocab:  # the output head: 8 bits, shared with the embedding if tied
                    nodes += self._head(node, embedding)
                elif k % self._group() == 0:
                    nodes += self._matmul(node)
                else:
                    nodes.append(node)
            else:
                nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        kept = [t for t in self.graph.initializer if t.name not in self.dropped]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + self.new_initializers)
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            from onnx import helper

            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

    # -- pieces ------------------------------------------------------------------
    def _group(self) -> int:
        return self.options.group_size if self.options.bits == 4 else TABLE_GROUP

    def _name(self, base: str) -> str:
        self.count += 1
        return f"llmk_q{self.count}_{base}"

    def _add(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def _drop(self, name: str) -> None:
        if sum(name in n.input for n in self.graph.node) <= 1:
            self.dropped.add(name)

    def _nbits(self, x: str, out: str, rows: np.ndarray, bits: int, group: int, stem: str,
               data: str | None = None, scales: str | None = None, zero: bool = False) -> Any:
        """``MatMulNBits`` of ``x`` with ``rows`` ([N, K], already quantized into
        ``data``/``scales`` if given)."""
        from onnx import helper

        n, k = rows.shape
        inputs = [x, data, scales]
        if zero:  # an explicit zero point of 0 (4-bit, packed): the minimum is added separately
            inputs.append(self._add(self._name(f"{stem}_zero"), np.zeros((n, (k // group + 1) // 2), np.uint8)))
        return helper.make_node("MatMulNBits", inputs, [out], name=self._name(stem), domain=MS_DOMAIN, K=k, N=n,
                                bits=bits, block_size=group, accuracy_level=4 if self.options.int8_compute else 0)

    def _int8_rows(self, rows: np.ndarray, stem: str) -> tuple[str, str]:
        """8-bit data ``[N, K/32, 32]`` (stored as q + 128: MatMulNBits' default zero point) and scales."""
        q, scales = symmetric_int8(rows, TABLE_GROUP)
        n, k = rows.shape
        data = (q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // TABLE_GROUP, TABLE_GROUP)
        return self._add(self._name(f"{stem}_q8"), data), self._add(self._name(f"{stem}_scales"), scales)

    def _gather(self, node: Any) -> list[Any]:
        """The embedding lookup on the 8-bit table: gather rows, then dequantize only those."""
        from onnx import helper

        table = self.array(node.input[0])
        data, scales = self._int8_rows(table, "embedding")
        self.table = (data, scales, table)
        self._drop(node.input[0])
        ids, out = node.input[1], node.output[0]
        t = [self._name(s) for s in ("rows", "scales", "float", "centered", "scales_col", "scaled", "shape", "hidden")]
        offset = self._add(self._name("offset"), np.array(128.0, np.float32))
        last_axis = self._add(self._name("last_axis"), np.array([-1], np.int64))
        hidden = self._add(self._name("hidden_dim"), np.array([table.shape[1]], np.int64))
        return [
            helper.make_node("Gather", [data, ids], [t[0]], axis=0),  # [..., K/32, 32]
            helper.make_node("Gather", [scales, ids], [t[1]], axis=0),  # [..., K/32]
            helper.make_node("Cast", [t[0]], [t[2]], to=1),
            helper.make_node("Sub", [t[2], offset], [t[3]]),
            helper.make_node("Unsqueeze", [t[1], last_axis], [t[4]]),
            helper.make_node("Mul", [t[3], t[4]], [t[5]]),
            helper.make_node("Shape", [ids], [t[6]]),
            helper.make_node("Concat", [t[6], hidden], [t[7]], axis=0),
            helper.make_node("Reshape", [t[5], t[7]], [out]),
        ]

    def _head(self, node: Any, embedding: Any) -> list[Any]:
        weight = self.array(node.input[1])  # [K, N]
        self._drop(node.input[1])
        if self.table is not None and np.array_equal(weight.T, self.table[2]):
            data, scales = self.table[:2]
        else:
            data, scales = self._int8_rows(np.ascontiguousarray(weight.T), "head")
        return [self._nbits(node.input[0], node.output[0], weight.T, 8, TABLE_GROUP, "head", data, scales)]

    def _matmul(self, node: Any) -> list[Any]:
        from onnx import helper

        rows = np.ascontiguousarray(self.array(node.input[1]).T)  # [N, K]
        self._drop(node.input[1])
        n, k = rows.shape
        x, out = node.input[0], node.output[0]
        if self.options.bits == 8:
            data, scales = self._int8_rows(rows, "linear")
            return [self._nbits(x, out, rows, 8, TABLE_GROUP, "linear", data, scales)]
        group = self.options.group_size
        q, scales, minimums = asymmetric_uint4(rows, group)
        data = self._add(self._name("q4"), pack_uint4(q).reshape(n, k // group, group // 2))
        scales_name = self._add(self._name("scales"), scales)
        # x @ (q·d + m) = MatMulNBits(x; q, d, zero 0) + blocksum(x) @ m
        minimums_name = self._add(self._name("minimums"), np.ascontiguousarray(minimums.T).astype(np.float16))
        partial, correction, minimums32 = self._name("partial"), self._name("correction"), self._name("minimums32")
        return [
            *self._block_sums(x, k, group),
            self._nbits(x, partial, rows, 4, group, "linear", data, scales_name, zero=True),
            helper.make_node("Cast", [minimums_name], [minimums32], to=1),
            helper.make_node("MatMul", [self.block_sums[(x, group)], minimums32], [correction]),
            helper.make_node("Add", [partial, correction], [out]),
        ]

    def _block_sums(self, x: str, k: int, group: int) -> list[Any]:
        """``x [..., K]`` summed over each group of columns (``[..., K/group]``); once per input."""
        from onnx import helper

        if (x, group) in self.block_sums:
            return []
        t = [self._name(s) for s in ("lead", "shape", "grouped", "sums")]
        blocks = self._add(self._name("blocks"), np.array([k // group, group], np.int64))
        axes = self._add(self._name("sum_axis"), np.array([-1], np.int64))
        self.block_sums[(x, group)] = t[3]
        return [
            helper.make_node("Shape", [x], [t[0]], end=-1),
            helper.make_node("Concat", [t[0], blocks], [t[1]], axis=0),
            helper.make_node("Reshape", [x, t[1]], [t[2]]),
            helper.make_node("ReduceSum", [t[2], axes], [t[3]], keepdims=0),
        ]
