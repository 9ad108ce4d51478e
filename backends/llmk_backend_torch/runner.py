"""Token ids in, logits out, on a PyTorch module with a KV cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmk.artifact import Task
from llmk.backend import DecodeState, Runner, left_pad


class TorchState(DecodeState):
    """A left-padded batch: the KV cache, the attention mask and next positions."""

    def __init__(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor):
        self.cache, self.mask, self.positions = cache, mask, positions

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        # Drop leading columns that are padding in every remaining row.
        trim = int(self.mask.any(dim=0).int().argmax())
        if trim > 0:
            self.mask = self.mask[:, trim:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, trim:, :]
                layer.values = layer.values[:, :, trim:, :]


class TorchRunner(Runner):
    def __init__(self, model: Any, task: Task, device: str):
        self.model = model
        self.task = task
        self.device = device
        config = model.config
        self.max_context = int(getattr(config, "max_position_embeddings", 2048) or 2048)

    def _forward(self, **inputs: Any) -> Any:
        with torch.inference_mode():
            return self.model(**inputs)

    @staticmethod
    def _logits(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy()

    def prefill(self, prompts: list[list[int]]) -> tuple[TorchState, np.ndarray]:
        from transformers import DynamicCache

        ids, mask = (torch.from_numpy(a).to(self.device) for a in left_pad(prompts))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
        state = TorchState(out.past_key_values, mask, positions[:, -1] + 1)
        return state, self._logits(out.logits[:, -1, :])

    def decode(self, state: TorchState, tokens: list[int]) -> np.ndarray:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        out = self._forward(input_ids=ids, attention_mask=state.mask, position_ids=state.positions[:, None],
                            past_key_values=state.cache, use_cache=True)
        state.cache = out.past_key_values
        state.positions = state.positions + 1
        return self._logits(out.logits[:, -1, :])

    def merge(self, states: list[TorchState]) -> TorchState:  # type: ignore[override]
        width = max(s.mask.shape[1] for s in states)
        first = states[0]
        masks = [torch.nn.functional.pad(s.mask, (width - s.mask.shape[1], 0)) for s in states]
        for index, layer in enumerate(first.cache.layers):
            for attr in ("keys", "values"):
                parts = [getattr(s.cache.layers[index], attr) for s in states]
                padded = [torch.nn.functional.pad(p, (0, 0, width - p.shape[2], 0)) for p in parts]
                setattr(layer, attr, torch.cat(padded, dim=0))
        return TorchState(first.cache, torch.cat(masks, dim=0), torch.cat([s.positions for s in states]))

    def logits(self, token_ids: list[int]) -> np.ndarray:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self._logits(self._forward(input_ids=ids, use_cache=False).logits[0])

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self._forward(
            input_ids=torch.as_tensor(input_ids, device=self.device),
            attention_mask=torch.as_tensor(attention_mask, device=self.device),
        )
        return out.last_hidden_state.float().cpu().numpy()

    def memory_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
