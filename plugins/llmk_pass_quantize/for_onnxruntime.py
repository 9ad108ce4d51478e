"""quantize on ONNX: weight-only ``MatMulNBits`` (or ORT's dynamic quantization, lossy).

The graph is rewritten here rather than by ONNX Runtime's ``MatMulNBitsQuantizer``
because that one has two losses this avoids (measured on SmolLM2, int4):

- its int4 zero point is an integer, which cannot land on a float-minimum grid
  (+16% perplexity). Here int4 keeps a float minimum, as a correction term:
  ``x @ (q·d + m) = MatMulNBits(x; q, d) + blocksum(x) @ (m + 8·d)``, where
  ``MatMulNBits`` without a zero point reads ``(q - 8)·d`` (its fastest kernel)
  and also computes the block sums, as extra output columns.
- it quantizes the output head to int4 (+10%) and has no 8-bit form of the
  embedding lookup. Here the embedding table is stored once, in 8 bits (groups
  of 32, symmetric: GGUF's Q8_0 grid), and serves both the lookup and — when the
  head is tied to it, as in most small models — the output projection.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llmk.artifact import Artifact
from llmk.errors import UnsupportedError
from llmk_pass_quantize.grids import asymmetric_uint4, pack_uint4, symmetric_int8
from llmk_pass_quantize.optimizer import QuantizeOptions

MODEL_FILE = "model.onnx"
MS_DOMAIN = "com.microsoft"
INPUT_IDS = "input_ids"  # the embedding lookup is the Gather on this graph input
#: The embedding table and the output head: 8 bits in groups of 32, always.
TABLE_GROUP = 32


def quantize(artifact: Artifact, out_dir: Path, options: QuantizeOptions) -> None:
    import onnx
    from llmk_backend_onnxruntime.export import META_FILE, save_onnx
    from llmk_backend_onnxruntime.runner import save_optimized

    meta = json.loads((artifact.path / META_FILE).read_text()) if (artifact.path / META_FILE).exists() else {}
    if meta.get("dtype", "fp32") != "fp32":
        raise UnsupportedError(f"quantize on onnxruntime rewrites fp32 graphs; this one is {meta['dtype']}")
    # llmk's decoder graph has 2-D [K, N] weights on 2-D activations already.
    decoder = meta.get("graph") == "decoder"
    source = artifact.path / MODEL_FILE
    if not decoder:
        # The dynamo export feeds weights through Transpose nodes; ONNX Runtime's basic
        # (hardware-independent) optimizations fold them into constant initializers.
        source = out_dir / "folded" / MODEL_FILE
        source.parent.mkdir()
        save_optimized(artifact.path / MODEL_FILE, source, "basic")
    target = out_dir / MODEL_FILE
    if options.activations:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, use_external_data_format=True)
    else:
        model = onnx.load(str(source))
        _Rewriter(model, options, flat=decoder).run()
        save_onnx(model, target)
    if not decoder:
        shutil.rmtree(source.parent)
    for file in artifact.path.glob("*.json"):
        if not file.name.startswith("llmk-manifest"):
            shutil.copy(file, out_dir / file.name)


class _Rewriter:
    """Replaces float ``MatMul``/``Gather`` weights in one pass over the graph."""

    def __init__(self, model: Any, options: QuantizeOptions, *, flat: bool = False):
        """``flat``: every ``MatMul`` input is 2-D (llmk's decoder graph), so the int4
        correction is one ``Gemm``."""
        from onnx import numpy_helper

        self.model, self.options, self.flat = model, options, flat
        self.graph = model.graph
        self.weights = {t.name: t for t in self.graph.initializer
                        if len(t.dims) == 2 and t.data_type == 1}  # 2-D float32
        self.array = lambda name: numpy_helper.to_array(self.weights[name])
        self.new_initializers: list[Any] = []
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

    def _nbits(self, x: str, out: str, k: int, n: int, bits: int, group: int, stem: str, data: str,
               scales: str) -> Any:
        """``MatMulNBits`` of ``x`` with a ``[N, K]`` matrix quantized into ``data``/``scales``,
        without a zero point: the default one (8 in 4 bits, 128 in 8 bits)."""
        from onnx import helper

        return helper.make_node("MatMulNBits", [x, data, scales], [out], name=self._name(stem), domain=MS_DOMAIN,
                                K=k, N=n, bits=bits, block_size=group,
                                accuracy_level=4 if self.options.int8_compute else 0)

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
        k, n = weight.shape
        return [self._nbits(node.input[0], node.output[0], k, n, 8, TABLE_GROUP, "head", data, scales)]

    def _matmul(self, node: Any) -> list[Any]:
        from onnx import helper

        rows = np.ascontiguousarray(self.array(node.input[1]).T)  # [N, K]
        self._drop(node.input[1])
        n, k = rows.shape
        x, out = node.input[0], node.output[0]
        if self.options.bits == 8:
            data, scales = self._int8_rows(rows, "linear")
            return [self._nbits(x, out, k, n, 8, TABLE_GROUP, "linear", data, scales)]
        group = self.options.group_size
        groups = k // group
        q, scales, minimums = asymmetric_uint4(rows, group)
        # x @ (q·d + m) = MatMulNBits(x; q, d) + blocksum(x) @ (m + 8·d). The block sums come out
        # of the same MatMulNBits, as `groups` more output columns whose weights are 1 on their
        # group and 0 elsewhere: (9 - 8)·1 and (8 - 8)·1, exact in 4 bits.
        indicator = np.full((groups, k), 8, np.uint8)
        for g in range(groups):
            indicator[g, g * group:(g + 1) * group] = 9
        packed = pack_uint4(np.concatenate([q, indicator])).reshape(n + groups, groups, group // 2)
        data = self._add(self._name("q4"), packed)
        scales_name = self._add(self._name("scales"), np.concatenate([scales, np.ones((groups, groups), np.float32)]))
        correction = self._add(self._name("correction"), np.ascontiguousarray((minimums + 8 * scales).T))
        wide, partial, sums = self._name("wide"), self._name("partial"), self._name("sums")
        widths = self._add(self._name("widths"), np.array([n, groups], np.int64))
        nodes = [
            self._nbits(x, wide, k, n + groups, 4, group, "linear", data, scales_name),
            helper.make_node("Split", [wide, widths], [partial, sums], axis=-1),
        ]
        if self.flat:
            return [*nodes, helper.make_node("Gemm", [sums, correction, partial], [out])]
        term = self._name("term")
        return [*nodes, helper.make_node("MatMul", [sums, correction], [term]),
                helper.make_node("Add", [partial, term], [out])]
