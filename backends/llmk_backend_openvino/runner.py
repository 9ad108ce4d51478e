"""Token ids in, logits out, on a compiled OpenVINO model whose KV cache is internal state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from llmk.artifact import Artifact
from llmk.backend import DecodeState, Runner, left_pad
from llmk_backend_openvino.backend import OpenVINOOptions

_core: ov.Core | None = None


def core() -> ov.Core:
    global _core
    if _core is None:
        _core = ov.Core()
    return _core


def compile_model(path: Path, dtype: str, options: OpenVINOOptions, cache_dir: Path | None = None) -> ov.CompiledModel:
    config = compile_config(dtype, options)
    if cache_dir is not None:
        config.update({"CACHE_DIR": str(cache_dir), "CACHE_MODE": "OPTIMIZE_SIZE"})
    return core().compile_model(str(path), "CPU", config)


def compile_config(dtype: str, options: OpenVINOOptions) -> dict[str, Any]:
    precision = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[dtype]
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": options.performance_hint.upper(),
        # By default the CPU plugin may compute in bf16, store the KV cache in u8
        # and quantize activations on the fly: each is a small error that breaks
        # token parity with the other backends. Keep everything in the asked dtype.
        "INFERENCE_PRECISION_HINT": precision,
        "KV_CACHE_PRECISION": precision,
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
    }
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
    return config


class OpenVINOState(DecodeState):
    """Which request holds the cache, the mask and next positions; ``rows`` is
    the gather applied to the cache on the next call."""

    def __init__(self, request: ov.InferRequest, mask: np.ndarray, positions: np.ndarray):
        self.request, self.mask, self.positions = request, mask, positions
        self.rows = np.arange(len(mask), dtype=np.int32)

    def select(self, rows: list[int]) -> None:
        # The cache keeps its padding columns (they are masked); only the rows change.
        self.rows = np.asarray(rows, dtype=np.int32)
        self.mask, self.positions = self.mask[rows], self.positions[rows]


class OpenVINORunner(Runner):
    def __init__(self, compiled: ov.CompiledModel, artifact: Artifact, device: str):
        meta = json.loads((artifact.path / "llmk-openvino.json").read_text())
        self.compiled = compiled
        self.task = meta["task"]
        self.device = device
        self.max_context = meta["max_context"]
        self._weights_bytes = sum(f.stat().st_size for f in artifact.path.glob("model.bin"))

    def _request(self) -> ov.InferRequest:
        # One request per batch in flight: the request owns that batch's cache.
        # (Creating one takes about a millisecond; not worth pooling.)
        return self.compiled.create_infer_request()

    def _infer(self, request: ov.InferRequest, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
               rows: np.ndarray) -> np.ndarray:
        request.infer({"input_ids": ids, "attention_mask": mask, "position_ids": positions, "beam_idx": rows})
        return request.get_tensor("logits").data

    def prefill(self, prompts: list[list[int]]) -> tuple[OpenVINOState, np.ndarray]:
        ids, mask = left_pad(prompts)
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        state = OpenVINOState(self._request(), mask, positions[:, -1] + 1)
        logits = self._infer(state.request, ids, mask, positions, state.rows)
        return state, np.array(logits[:, -1], dtype=np.float32)

    def decode(self, state: OpenVINOState, tokens: list[int]) -> np.ndarray:
        state.mask = np.concatenate([state.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        logits = self._infer(state.request, ids, state.mask, state.positions[:, None], state.rows)
        state.rows = np.arange(len(tokens), dtype=np.int32)
        state.positions = state.positions + 1
        return np.array(logits[:, -1], dtype=np.float32)

    def merge(self, states: list[OpenVINOState]) -> OpenVINOState:  # type: ignore[override]
        # The caches live in each request's state: read them out (with any pending
        # row selection applied), pad, concatenate, and write them into a new request.
        width = max(s.mask.shape[1] for s in states)
        request = self._request()
        variables = {v.name: v for v in request.query_state()}
        sources = [{v.name: v for v in s.request.query_state()} for s in states]
        for name, variable in variables.items():
            parts = []
            for state, source in zip(states, sources):
                data = np.array(source[name].state.data)[state.rows]
                parts.append(np.pad(data, ((0, 0), (0, 0), (width - data.shape[2], 0), (0, 0))))
            variable.state = ov.Tensor(np.ascontiguousarray(np.concatenate(parts)))
        mask = np.concatenate([np.pad(s.mask, ((0, 0), (width - s.mask.shape[1], 0))) for s in states])
        return OpenVINOState(request, mask, np.concatenate([s.positions for s in states]))

    def logits(self, token_ids: list[int]) -> np.ndarray:
        ids = np.asarray([token_ids], dtype=np.int64)
        positions = np.arange(len(token_ids), dtype=np.int64)[None]
        logits = self._infer(self._request(), ids, np.ones_like(ids), positions, np.zeros(1, dtype=np.int32))
        return np.array(logits[0], dtype=np.float32)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        request = self.compiled.create_infer_request()
        request.infer({"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    def memory_bytes(self) -> int:
        return self._weights_bytes

    def close(self) -> None:
        self.compiled = None
