"""Token ids in, logits out, on a Hugging Face PyTorch model with a paged KV cache.

Each layer's cache is a pool of ``num_blocks * block_size`` positions. A step
runs the model once on every step's tokens laid end to end (batch 1, per-token
positions), so the projections and MLPs see one matrix whatever the mix of
prompt chunks and decode tokens. Attention is llmk's own function, registered
with transformers' attention interface: it writes each token's keys and values
at its position in the pool, then attends per sequence to the positions its
block table names — all decoding sequences in one batched call, each prompt
chunk in its own.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmk.artifact import Task
from llmk.backend import KVLayout, Runner, SequenceStep
from llmk_backend_torch.lora import LoraWeights, RowAdapters, load_lora

#: The name llmk's attention function is registered under in transformers.
ATTENTION = "llmk_paged"
BLOCK_SIZE = 16


@dataclass
class _Group:
    """Query rows that attend together: decode rows of several sequences, or one
    sequence's multi-token chunk."""

    rows: torch.Tensor | slice  # rows of the step's token axis
    index: torch.Tensor  # pool positions to attend to: [R, L] (decode) or [L]
    mask: torch.Tensor | None  # [R, 1, 1, L] valid positions, or [n, L] causal (None: is_causal)
    decode: bool


@dataclass
class _Step:
    """What the attention function needs for one forward, shared by every layer."""

    pools: list[tuple[torch.Tensor, torch.Tensor]]
    slots: torch.Tensor  # [T]: the pool position each new token's keys and values go to
    groups: list[_Group]


def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` [1, heads, T, dim], ``key`` and
    ``value`` [1, kv_heads, T, dim]; returns [1, T, heads, dim]."""
    step: _Step | None = kwargs.get("llmk_step")
    if step is None:  # a plain forward (scoring): a causal batch of one
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    keys, values = step.pools[module.layer_idx]
    keys.index_copy_(0, step.slots, key[0].transpose(0, 1))
    values.index_copy_(0, step.slots, value[0].transpose(0, 1))
    q = query[0]  # [heads, T, dim]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)
    for group in step.groups:
        k = keys[group.index]  # [R, L, kv_heads, dim] or [L, kv_heads, dim]
        v = values[group.index]
        if group.decode:
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:, group.rows].transpose(0, 1).unsqueeze(2), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3),
                attn_mask=group.mask, scale=scaling, enable_gqa=True)  # [R, heads, 1, dim]
            out[group.rows] = o[:, :, 0]
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:, group.rows].unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0),
                attn_mask=group.mask, is_causal=group.mask is None, scale=scaling, enable_gqa=True)  # [1, heads, n, d]
            out[group.rows] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, paged_attention)


class TorchRunner(Runner):
    def __init__(self, model: Any, task: Task, device: str):
        self.model = model
        self.task = task
        self.device = device
        config = model.config
        self.max_context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self._pools: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._adapters: RowAdapters | None = None  # hooks, once an adapter is loaded
        self._adapter_weights: weakref.WeakSet[LoraWeights] = weakref.WeakSet()  # held while the engine serves them
        if task == "generate":
            heads = config.num_attention_heads
            self._kv_heads = getattr(config, "num_key_value_heads", None) or heads
            self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            self._dtype = next(model.parameters()).dtype
            per_token = config.num_hidden_layers * 2 * self._kv_heads * self._head_dim * self._dtype.itemsize
            self.kv_layout = KVLayout(bytes_per_token=per_token, block_size=BLOCK_SIZE)

    def _forward(self, **inputs: Any) -> Any:
        with torch.inference_mode():
            return self.model(**inputs)

    @staticmethod
    def _logits(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy()

    # -- the step contract ---------------------------------------------------------
    def allocate_cache(self, num_blocks: int, num_slots: int, capacity_blocks: int | None = None) -> None:
        shape = (num_blocks * BLOCK_SIZE, self._kv_heads, self._head_dim)
        self._pools = [(torch.zeros(shape, dtype=self._dtype, device=self.device),
                        torch.zeros(shape, dtype=self._dtype, device=self.device))
                       for _ in range(self.model.config.num_hidden_layers)]

    def forward(self, steps: list[SequenceStep]) -> np.ndarray:
        ids, positions, slots, keep = [], [], [], []
        decode_rows, decode_index, decode_lengths = [], [], []
        groups: list[_Group] = []
        for step in steps:
            first = len(ids)
            end = step.start + len(step.tokens)
            table = _positions(step.blocks, end)
            ids += step.tokens
            positions += range(step.start, end)
            slots.append(table[step.start:end])
            keep += range(first + len(step.tokens) - step.logits, first + len(step.tokens))
            if len(step.tokens) == 1:
                decode_rows.append(first)
                decode_index.append(table)
                decode_lengths.append(end)
            else:
                groups.append(_Group(slice(first, first + len(step.tokens)), torch.from_numpy(table).to(self.device),
                                     self._causal(step.start, len(step.tokens)), decode=False))
        if decode_rows:
            groups.append(self._decode_group(decode_rows, decode_index, decode_lengths))
        step_info = _Step(self._pools, torch.from_numpy(np.concatenate(slots)).to(self.device), groups)
        with self._adapted(self._adapter_rows(steps, len(ids))):
            out = self._forward(input_ids=self._tensor([ids]), position_ids=self._tensor([positions]),
                                use_cache=False, logits_to_keep=self._tensor(keep), llmk_step=step_info)
        return self._logits(out.logits[0])

    def _adapted(self, active: list[tuple[LoraWeights, torch.Tensor | None]]) -> AbstractContextManager[None]:
        if self._adapters is None:
            return nullcontext()
        if not self._adapter_weights:  # every adapter was dropped (and no request still runs one)
            self._adapters.release()
        return self._adapters.applied(active)

    def _adapter_rows(self, steps: list[SequenceStep], total: int) -> list[tuple[LoraWeights, torch.Tensor | None]]:
        """Each adapter of the step with the token rows that use it (``None``: every row)."""
        if self._adapters is None:
            return []
        rows: dict[int, tuple[LoraWeights, list[int]]] = {}
        first = 0
        for step in steps:
            if step.adapter is not None:
                rows.setdefault(id(step.adapter), (step.adapter, []))[1].extend(range(first, first + len(step.tokens)))
            first += len(step.tokens)
        return [(weights, None if len(taken) == total else self._tensor(taken)) for weights, taken in rows.values()]

    def load_adapter(self, path: Path) -> LoraWeights:
        weights = load_lora(path, self.model, self.device, self._dtype)
        if self._adapters is None:
            self._adapters = RowAdapters(self.model)
        self._adapters.attach(weights)
        self._adapter_weights.add(weights)
        return weights

    def _tensor(self, values: Any) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _causal(self, start: int, count: int) -> torch.Tensor | None:
        """Query ``j`` (position ``start + j``) sees positions up to ``start + j``."""
        if start == 0:
            return None
        visible = torch.arange(start + count, device=self.device)[None, :] <= (
            start + torch.arange(count, device=self.device)[:, None])
        return visible

    def _decode_group(self, rows: list[int], tables: list[np.ndarray], lengths: list[int]) -> _Group:
        width = max(lengths)
        index = np.zeros((len(rows), width), dtype=np.int64)
        for row, table in enumerate(tables):
            index[row, :len(table)] = table
        mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
        return _Group(self._tensor(rows), torch.from_numpy(index).to(self.device),
                      torch.from_numpy(mask[:, None, None, :]).to(self.device), decode=True)

    # -- scoring and embedding -------------------------------------------------------
    def logits(self, token_ids: list[int], adapter: LoraWeights | None = None) -> np.ndarray:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        with self._adapted([] if adapter is None else [(adapter, None)]):
            return self._logits(self._forward(input_ids=ids, use_cache=False).logits[0])

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self._forward(
            input_ids=torch.as_tensor(input_ids, device=self.device),
            attention_mask=torch.as_tensor(attention_mask, device=self.device),
        )
        return out.last_hidden_state.float().cpu().numpy()

    def memory_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        adapters = 0 if self._adapters is None else self._adapters.nbytes()
        return sum(t.numel() * t.element_size() for t in tensors) + sum(w.nbytes() for w in self._adapter_weights) \
            + adapters

    def close(self) -> None:
        self.model = None
        self._pools = []
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _positions(blocks: list[int], length: int) -> np.ndarray:
    """Pool positions of a sequence's first ``length`` positions, through its block table."""
    table = np.asarray(blocks[:-(-length // BLOCK_SIZE)], dtype=np.int64)
    return (table[:, None] * BLOCK_SIZE + np.arange(BLOCK_SIZE)).ravel()[:length]
