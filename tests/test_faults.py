"""Fault injection on the cache: builds killed mid-way (kill -9), damaged cached
files, a full disk. Whatever happens, the next load either rebuilds or fails with
a typed error; it never serves a model that loads wrong.

Every check ends with the same proof: a fresh kernel on the damaged cache loads
the model and generates the same greedy tokens as a build that was never
interrupted (``reference``). The killed builds run in child processes that stop
at a chosen point of the work (a function wrapped to block once it has written
its part) and tell the test so with a marker file: the kill never races the work.
docs/RELIABILITY.md says what each test injects and what comes out.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmk
from llmk import cache as cache_module
from llmk.cache import MANIFEST, TMP_PREFIX, Cache, CacheFullError

PROMPT = "The cat"
TOKENS = 8


# -- helpers -------------------------------------------------------------------------------------------


class Events:
    """Records what ``llmk.cache`` logs (event name and fields), in order."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def _record(self, level: str):
        def record(event: str, **fields) -> None:
            self.records.append({"level": level, "event": event, **fields})

        return record

    def __getattr__(self, level: str):
        if level in ("debug", "info", "warning", "error"):
            return self._record(level)
        raise AttributeError(level)

    def named(self, event: str) -> list[dict]:
        return [r for r in self.records if r["event"] == event]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    recorder = Events()
    monkeypatch.setattr(cache_module, "log", recorder)
    return recorder


def write_tiny_gguf(hf_dir: Path, path: Path) -> Path:
    """The tiny Llama as an F32 GGUF file, laid out as llama.cpp's converter writes
    it (its q/k rows permuted, a gpt2-style BPE vocabulary), which transformers
    converts back to the same model: a GGUF conversion that takes a second."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = set()
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
        special.add(added["id"])
    size = config["vocab_size"]
    tokens = [""] * size
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(size)])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(True)
    template = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if template:
        writer.add_chat_template(template)

    def permute(weight, n_heads):  # llama.cpp's rotary layout; transformers undoes it
        return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    state = load_file(str(hf_dir / "model.safetensors"))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = permute(weight, heads)
            elif gguf_name == "attn_k":
                weight = permute(weight, kv_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


#: The three kinds of build the kill tests interrupt: (source, backend, passes, cache kind, pause point).
#: The pause point is a function the build calls once it has written part of the entry.
BUILDS = {
    "conversion": ("gguf", "torch", [], "sources", "transformers:PreTrainedModel.save_pretrained"),
    "onnx-export": ("hf", "onnxruntime", [], "exports", "onnx:save_model"),
    "quantize": ("hf", "torch", ["quantize"], "passes", "safetensors.torch:save_file"),
}


def source_of(kind: str, tiny_llama: Path, tiny_gguf: Path) -> str:
    return str(tiny_gguf if kind == "gguf" else tiny_llama)


def greedy(cache_dir: Path, source: str, backend: str, passes: list[str]) -> list[int]:
    with llmk.Kernel(cache_dir=cache_dir, autoload=False) as kernel:
        model = kernel.load("m", source, backend=backend, passes=passes)
        return model.generate(PROMPT, max_tokens=TOKENS, temperature=0).token_ids


@pytest.fixture(scope="module")
def reference(tiny_llama, tiny_gguf, tmp_path_factory):
    """Greedy tokens of never-interrupted builds, each on its own fresh cache."""
    found: dict[tuple, list[int]] = {}

    def get(source: str, backend: str, passes: list[str]) -> list[int]:
        key = (source, backend, tuple(passes))
        if key not in found:
            found[key] = greedy(tmp_path_factory.mktemp("reference-cache"), source, backend, passes)
        return found[key]

    return get


def temp_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)) if directory.is_dir() else []


def entries(directory: Path) -> list[Path]:
    """The finished entries built by the step under test: not temp dirs, and not a GGUF
    source's tokenizer (``sources/NAME-tokenizer``, read before any conversion starts)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if not p.name.startswith(TMP_PREFIX) and not p.name.endswith("-tokenizer"))


#: The child: wraps the pause point so that, once it has run, the child writes the
#: marker and blocks; then loads the model (which builds the entry) on the cache.
CHILD = r"""
import importlib, json, os, sys, time
cache_dir, source, backend, passes, target, marker = sys.argv[1:7]
module_name, _, attribute = target.partition(":")
owner = importlib.import_module(module_name)
*path, leaf = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, leaf)

def paused(*args, **kwargs):
    result = original(*args, **kwargs)
    with open(marker + ".part", "w") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".part", marker)
    while True:
        time.sleep(60)

setattr(owner, leaf, paused)
import llmk
llmk.Kernel(cache_dir=cache_dir, autoload=False).load("m", source, backend=backend, passes=json.loads(passes))
print("the build finished without reaching the pause point", flush=True)
"""


def kill_mid_build(tmp_path: Path, cache_dir: Path, source: str, backend: str, passes: list[str], target: str,
                   kind: str, events: Events) -> Path:
    """Run the load in a child until it blocks at ``target``, check that opening the
    cache meanwhile leaves the live build alone, kill -9 it; return its temp dir."""
    marker = tmp_path / "paused"
    output = tmp_path / "child.log"
    with open(output, "w") as log_file:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(cache_dir), source, backend, json.dumps(passes),
                                  target, str(marker)], stdout=log_file, stderr=subprocess.STDOUT,
                                 env={**os.environ, "LLMK_DISABLE_PLUGIN_AUTOLOAD": "1"})
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():  # the child's own sign that it is mid-build
            assert child.poll() is None, f"the child exited ({child.returncode}):\n{output.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the child never paused:\n{output.read_text()[-3000:]}"
            time.sleep(0.05)
        (leftover,) = temp_dirs(cache_dir / kind)
        assert leftover.name.endswith(f"-pid{child.pid}")
        assert any(p.is_file() for p in leftover.rglob("*")), "the build had written nothing yet"
        # A live build is never swept, whoever opens the cache, however old its directory.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cache_module, "PID_REUSE_AGE", 0.0)
            patch.setattr(cache_module, "UNOWNED_AGE", 0.0)
            assert Cache(cache_dir).sweep() == []
        assert leftover.is_dir() and not events.named("cache.tmp_removed")
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert leftover.is_dir() and entries(cache_dir / kind) == []  # what a kill leaves: a temp dir, no entry
    return leftover


# -- 1. kill -9 mid-build ----------------------------------------------------------------------------


@pytest.mark.parametrize("build", list(BUILDS))
def test_a_build_killed_mid_way_is_swept_and_rebuilt(build, tiny_llama, tiny_gguf, reference, tmp_path, events):
    source_kind, backend, passes, kind, target = BUILDS[build]
    source = source_of(source_kind, tiny_llama, tiny_gguf)
    expected = reference(source, backend, passes)
    cache_dir = tmp_path / "cache"
    leftover = kill_mid_build(tmp_path, cache_dir, source, backend, passes, target, kind, events)

    with llmk.Kernel(cache_dir=cache_dir, autoload=False) as kernel:  # opening the cache sweeps it
        assert [e["path"] for e in events.named("cache.tmp_removed")] == [str(leftover)]
        assert not leftover.exists()
        tokens = kernel.load("m", source, backend=backend, passes=passes).generate(
            PROMPT, max_tokens=TOKENS, temperature=0).token_ids
    assert tokens == expected
    (entry,) = entries(cache_dir / kind)
    assert Cache.verify(entry) is None and temp_dirs(cache_dir / kind) == []
    assert not events.named("cache.corrupt_rebuilt")  # nothing was ever renamed into place half-built


# -- 2. damaged cached files ----------------------------------------------------------------------------


def damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    stat = file.stat()
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
        return
    offset = len(data) * 2 // 3  # in the tensor data, past any header
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(bytes([data[offset] ^ 0x40]))
    if how == "bitflip-same-mtime":  # a flip that even keeps the file's mtime (its ctime still moves)
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


DAMAGES = [
    # (source, backend, cache kind, file, damage, what the next load's verification reports)
    ("gguf", "torch", "sources", "model.safetensors", "truncate", "truncated"),
    ("gguf", "torch", "sources", "model.safetensors", "bitflip", "content changed"),
    ("hf", "onnxruntime", "exports", "model.onnx.data", "bitflip-same-mtime", "content changed"),
    ("hf", "onnxruntime", "exports", "model.onnx", "truncate", "truncated"),
]


@pytest.mark.parametrize(("source_kind", "backend", "kind", "filename", "how", "reason"), DAMAGES,
                         ids=[f"{d[2]}-{d[3]}-{d[4]}" for d in DAMAGES])
def test_a_damaged_cached_file_is_rebuilt_and_logged(source_kind, backend, kind, filename, how, reason, tiny_llama,
                                                     tiny_gguf, reference, tmp_path, events):
    source = source_of(source_kind, tiny_llama, tiny_gguf)
    cache_dir = tmp_path / "cache"
    assert greedy(cache_dir, source, backend, []) == reference(source, backend, [])
    (entry,) = entries(cache_dir / kind)
    file = entry / filename
    original = file.read_bytes()
    damage(file, how)
    problem = Cache.verify(entry)
    assert problem is not None and problem.file == filename and reason in problem.reason

    assert greedy(cache_dir, source, backend, []) == reference(source, backend, [])
    (event,) = events.named("cache.corrupt_rebuilt")
    assert event["level"] == "warning" and event["artifact"] == f"{kind}/{entry.name}"
    assert event["file"] == str(file) and reason in event["reason"]
    assert Cache.verify(entry) is None and file.read_bytes() == original  # the build is deterministic


def test_an_entry_edited_under_the_same_stat_is_caught_by_full_verification(tmp_path, monkeypatch):
    """What the stat shortcut trusts (docs/RELIABILITY.md): a file whose inode, mtime
    and ctime are those recorded is not re-read, unless LLMK_CACHE_VERIFY=full."""
    cache = Cache(tmp_path)
    entry = cache.build("exports", "e", lambda out: (out / "w.bin").write_bytes(b"w" * 4096))
    manifest = json.loads((entry / MANIFEST).read_text())
    assert set(manifest) >= {"files", "sha256", "stat"} and manifest["files"] == {"w.bin": 4096}
    # Rot below the file system: the content no longer matches, nothing in its stat moved.
    manifest["sha256"]["w.bin"] = "0" * 64
    (entry / MANIFEST).write_text(json.dumps(manifest))
    assert Cache.verify(entry) is None
    monkeypatch.setenv("LLMK_CACHE_VERIFY", "full")
    assert "content changed" in Cache.verify(entry).reason


def test_an_entry_from_before_digests_is_checked_by_size(tmp_path, events):
    cache = Cache(tmp_path)
    entry = cache.build("exports", "e", lambda out: (out / "w.bin").write_bytes(b"w" * 4096))
    (entry / MANIFEST).write_text(json.dumps({"files": {"w.bin": 4096}, "created": 0}))
    assert Cache.verify(entry, full=True) is None
    (entry / "w.bin").write_bytes(b"w" * 100)
    assert Cache.verify(entry).reason == "truncated: 100 bytes, 4096 when built"
    cache.build("exports", "e", lambda out: (out / "w.bin").write_bytes(b"w" * 4096))
    assert [e["reason"] for e in events.named("cache.corrupt_rebuilt")] == ["truncated: 100 bytes, 4096 when built"]


# -- 3. temp directories: whose are swept ---------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def make_tmp(directory: Path, name: str, age: float = 0.0) -> Path:
    path = directory / name
    path.mkdir(parents=True)
    (path / "model.bin").write_bytes(b"half")
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_which_temp_dirs_are_swept(tmp_path, events):
    exports = tmp_path / "exports"
    dead = make_tmp(exports, f".tmp-a-0123abcd-pid{dead_pid()}")
    mine_new = make_tmp(exports, f".tmp-b-0123abcd-pid{os.getpid()}")  # unlocked, live pid: not locked *yet*
    mine_old = make_tmp(exports, f".tmp-c-0123abcd-pid{os.getpid()}", age=2 * cache_module.PID_REUSE_AGE)
    legacy_new = make_tmp(exports, ".tmp-d-0123abcd")  # an older llmk's name: no pid, no lock
    legacy_old = make_tmp(exports, ".tmp-e-0123abcd", age=2 * cache_module.UNOWNED_AGE)
    locked = make_tmp(exports, f".tmp-f-0123abcd-pid{dead_pid()}", age=2 * cache_module.UNOWNED_AGE)
    memo = tmp_path / f"digests.0123abcd.pid{dead_pid()}.tmp"
    memo.write_text("{")
    held = cache_module._lock(locked, block=True)  # a build that holds its lock is alive, whatever its name says
    try:
        Cache(tmp_path)
    finally:
        cache_module._unlock(held)
    removed = sorted(e["path"] for e in events.named("cache.tmp_removed"))
    assert removed == sorted(str(p) for p in (dead, mine_old, legacy_old, memo))
    assert all(p.exists() for p in (mine_new, legacy_new, locked))
    assert Cache(tmp_path).entries() == []  # temp dirs are not entries


def test_a_long_lived_cache_sweeps_a_dead_build_of_the_same_entry(tmp_path, events):
    cache = Cache(tmp_path)  # opened before the other process died
    dead = make_tmp(tmp_path / "exports", f".tmp-e-0123abcd-pid{dead_pid()}")
    entry = cache.build("exports", "e", lambda out: (out / "w.bin").write_bytes(b"w"))
    assert [e["path"] for e in events.named("cache.tmp_removed")] == [str(dead)]
    assert temp_dirs(tmp_path / "exports") == [] and Cache.verify(entry) is None


def test_clear_keeps_a_live_build(tmp_path):
    cache = Cache(tmp_path)
    cache.build("exports", "a", lambda out: (out / "w.bin").write_bytes(b"w"))

    def build_while_clearing(out: Path) -> None:
        (out / "w.bin").write_bytes(b"w")
        assert cache.clear() == 1  # removes "a", not this build's directory
        assert out.is_dir()

    assert Cache.verify(cache.build("exports", "b", build_while_clearing)) is None
    assert [e["name"] for e in cache.entries()] == ["b"]


# -- 4. a full disk -------------------------------------------------------------------------------------


def check_full(error: CacheFullError, cache_dir: Path) -> None:
    message = str(error)
    assert str(cache_dir) in message and "no space left on device" in message and "free of" in message
    assert error.root == cache_dir and error.free is not None and error.entry.startswith("exports/onnxruntime-")
    assert temp_dirs(cache_dir / "exports") == [] and entries(cache_dir / "exports") == []
    assert all(e["valid"] for e in Cache(cache_dir).entries())


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs (needs root and mount rights)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20M", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs to fill ({error}); test_a_full_disk_simulated injects ENOSPC instead")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip() or done.returncode}); "
                    "test_a_full_disk_simulated injects ENOSPC instead")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_a_full_disk_fails_the_build_cleanly(small_disk, tiny_llama, reference, tmp_path, events):
    expected = reference(str(tiny_llama), "onnxruntime", [])
    cache_dir = small_disk / "cache"
    cache_dir.mkdir()
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f:  # leave 64 KiB: the ONNX export needs ~550 KiB
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))
    with llmk.Kernel(cache_dir=cache_dir, autoload=False) as kernel, pytest.raises(CacheFullError) as info:
        kernel.load("m", str(tiny_llama), backend="onnxruntime")
    check_full(info.value, cache_dir)
    assert info.value.free < 1024 * 1024
    assert events.named("cache.build_failed")
    ballast.unlink()
    assert greedy(cache_dir, str(tiny_llama), "onnxruntime", []) == expected


def test_a_full_disk_simulated(tiny_llama, reference, tmp_path, monkeypatch):
    """The same without mount rights: the export's writer fails with ENOSPC half-way."""
    import onnx

    expected = reference(str(tiny_llama), "onnxruntime", [])
    cache_dir = tmp_path / "cache"
    save_model = onnx.save_model

    def full_disk(model, path, *args, **kwargs):
        Path(path).write_bytes(b"\x08half a graph")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx, "save_model", full_disk)
    with llmk.Kernel(cache_dir=cache_dir, autoload=False) as kernel, pytest.raises(CacheFullError) as info:
        kernel.load("m", str(tiny_llama), backend="onnxruntime")
    check_full(info.value, cache_dir)
    monkeypatch.setattr(onnx, "save_model", save_model)
    assert greedy(cache_dir, str(tiny_llama), "onnxruntime", []) == expected


@pytest.mark.parametrize("error", [
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                 "\"No space left on device\" })"),  # safetensors' writer, in Rust
    OSError(errno.EDQUOT, "Disk quota exceeded"),
])
def test_space_errors_from_native_writers_are_recognized(tmp_path, error):
    def build(out: Path) -> None:
        (out / "w.bin").write_bytes(b"partial")
        try:
            raise error
        except Exception as inner:
            raise ValueError("the writer failed") from inner  # wrapped, as libraries do

    with pytest.raises(CacheFullError):
        Cache(tmp_path).build("sources", "e", build)
    assert list((tmp_path / "sources").iterdir()) == []
