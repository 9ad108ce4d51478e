"""Token ids in, logits out, on an ONNX Runtime session with explicit KV-cache tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llmk.artifact import Artifact
from llmk.backend import DecodeState, Runner, left_pad
from llmk_backend_onnxruntime.backend import OnnxRuntimeOptions

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def save_optimized(path: Path, out: Path, level: str) -> None:
    """Write the graph as optimized at ``level`` ("all" is specific to this machine's CPU)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    so.log_severity_level = 3
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def make_session(path: Path, device: str, options: OnnxRuntimeOptions) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION_LEVELS[options.graph_optimization]
    so.log_severity_level = 3
    if options.threads:
        so.intra_op_num_threads = options.threads
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=providers)


class OnnxState(DecodeState):
    """KV tensors (NumPy on CPU, ``OrtValue`` on the GPU), mask and next positions."""

    def __init__(self, past: list[Any], mask: np.ndarray, positions: np.ndarray, device: str):
        self.past, self.mask, self.positions, self.device = past, mask, positions, device

    def select(self, rows: list[int]) -> None:
        trim = int(self.mask[rows].any(axis=0).argmax())  # leading columns that are padding in every kept row
        past = [_host(p) for p in self.past]
        past = [p[rows][:, :, trim:] for p in past]
        self.past = [_to_device(p, self.device) for p in past]
        self.mask, self.positions = self.mask[rows][:, trim:], self.positions[rows]


def _host(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else value


def _to_device(array: np.ndarray, device: str) -> Any:
    if not device.startswith("cuda"):
        return array
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", int(device.partition(":")[2] or 0))


class OnnxRuntimeRunner(Runner):
    def __init__(self, session: ort.InferenceSession, artifact: Artifact, device: str):
        meta = json.loads((artifact.path / "llmk-onnx.json").read_text())
        self.session = session
        self.task = meta["task"]
        self.device = device
        self.max_context = meta["max_context"]
        self._past_names = [n for n in meta["inputs"] if n.startswith("past.")]
        self._present_names = [n for n in meta["outputs"] if n.startswith("present.")]
        self._weights_bytes = sum(f.stat().st_size for f in artifact.path.glob("model.onnx*"))
        past_input = next((i for i in session.get_inputs() if i.name.startswith("past.")), None)
        if past_input is not None:
            self._kv_shape = past_input.shape  # [batch, kv_heads, past, head_dim]
            self._kv_dtype = np.float16 if "float16" in past_input.type else np.float32

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any]) -> list[Any]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if not self.device.startswith("cuda"):
            feed.update(zip(self._past_names, past))
            return self.session.run(None, feed)
        # On the GPU the KV cache stays on the device between steps (IO binding);
        # only ids, mask, positions and the logits cross the bus.
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        index = int(self.device.partition(":")[2] or 0)
        for name in self._present_names:
            binding.bind_output(name, "cuda", index)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return [logits.numpy(), *present]

    def _empty_past(self, batch: int) -> list[Any]:
        _, heads, _, head_dim = self._kv_shape
        empty = np.zeros((batch, heads, 0, head_dim), dtype=self._kv_dtype)
        return [_to_device(empty, self.device) for _ in self._past_names]

    def prefill(self, prompts: list[list[int]]) -> tuple[OnnxState, np.ndarray]:
        ids, mask = left_pad(prompts)
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, *present = self._run(ids, mask, positions, self._empty_past(len(prompts)))
        return OnnxState(present, mask, positions[:, -1] + 1, self.device), logits[:, -1].astype(np.float32)

    def decode(self, state: OnnxState, tokens: list[int]) -> np.ndarray:
        state.mask = np.concatenate([state.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        logits, *state.past = self._run(ids, state.mask, state.positions[:, None], state.past)
        state.positions = state.positions + 1
        return logits[:, -1].astype(np.float32)

    def merge(self, states: list[OnnxState]) -> OnnxState:  # type: ignore[override]
        width = max(s.mask.shape[1] for s in states)
        past = []
        for index in range(len(states[0].past)):
            parts = [_host(s.past[index]) for s in states]
            padded = [np.pad(p, ((0, 0), (0, 0), (width - p.shape[2], 0), (0, 0))) for p in parts]
            past.append(_to_device(np.concatenate(padded), self.device))
        mask = np.concatenate([np.pad(s.mask, ((0, 0), (width - s.mask.shape[1], 0))) for s in states])
        return OnnxState(past, mask, np.concatenate([s.positions for s in states]), self.device)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        ids = np.asarray([token_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        positions = np.arange(len(token_ids), dtype=np.int64)[None]
        return self._run(ids, mask, positions, self._empty_past(1))[0][0].astype(np.float32)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        return self.session.run(None, feed)[0].astype(np.float32)

    def memory_bytes(self) -> int:
        # The initializers dominate, and the session holds them as stored.
        return self._weights_bytes

    def close(self) -> None:
        self.session = None
