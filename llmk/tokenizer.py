"""Tokenizing, chat templates and incremental detokenizing, shared by all backends."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from llmk.errors import OptionsError, SourceError, UnsupportedError


class Tokenizer:
    """A Hugging Face fast tokenizer loaded from the source's directory."""

    def __init__(self, directory: Path, *, source: str):
        try:
            self._tok = _load_fast(directory) or _load_auto(directory)
        except Exception as error:  # transformers raises many types for bad files
            raise SourceError(source, f"cannot load the tokenizer from {directory}: {error}") from error
        self.eos_ids = _eos_ids(directory, self._tok)
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        self.max_length = _max_length(directory, self._tok)
        # Encoding sets the Rust tokenizer's padding and truncation, which are shared state:
        # a padded batch in one thread and an encode in another would cross (ragged batches).
        self._lock = threading.Lock()

    @property
    def hf_tokenizer(self) -> Any:
        """The Hugging Face tokenizer underneath (grammar engines read its vocabulary)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to ``vocab_size - 1`` (added tokens included)."""
        return len(self._tok)

    def token_text(self, token: int) -> str:
        """One token as text, special tokens included (a piece of a multi-byte
        character shows as U+FFFD)."""
        return self._tok.decode([token], skip_special_tokens=False)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        check_text(text)
        with self._lock:
            return list(self._tok.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._tok, "chat_template", None)
        return template if isinstance(template, str) else None

    def apply_chat_template(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        """The prompt's ids; ``extra`` goes to the template (``tools=`` where it renders them)."""
        if not getattr(self._tok, "chat_template", None):
            raise UnsupportedError("this model has no chat template; use generate() with a plain prompt")
        for i, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    check_text(value, f"messages[{i}].{key}")
        with self._lock:
            ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def batch(self, texts: list[str]) -> tuple[Any, Any]:
        """Padded ``input_ids`` and ``attention_mask`` (NumPy); a text longer than
        ``max_length`` tokens is refused, never cut short without a word."""
        for i, text in enumerate(texts):
            check_text(text, f"input[{i}]")
        with self._lock:
            enc = self._tok(texts, padding=True, truncation=False, return_tensors="np")
        lengths = enc["attention_mask"].sum(axis=1)
        for i, length in enumerate(lengths):
            if length > self.max_length:
                raise OptionsError(f"input[{i}]", f"it is {int(length)} tokens; this model reads at most "
                                   f"{self.max_length}")
        return enc["input_ids"], enc["attention_mask"]


def check_text(text: str, what: str = "text") -> None:
    """Refuse text that is not Unicode a tokenizer can read: a lone UTF-16 surrogate
    (JSON's ``"\ud800"`` decodes to one) cannot become UTF-8."""
    if not isinstance(text, str):
        raise OptionsError(what, f"expected a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise OptionsError(what, f"it holds a lone surrogate (U+{ord(text[error.start]):04X}) at character "
                           f"{error.start}, which is not valid Unicode text") from None


SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _load_fast(directory: Path) -> Any | None:
    """Build the fast tokenizer straight from ``tokenizer.json`` (parsed in Rust) and
    ``tokenizer_config.json``: about half the time of ``AutoTokenizer``, which
    parses the same megabytes again in Python — a large share of a cached load."""
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    special = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),  # (tokenizer_object= would deep-copy it: slower)
        model_max_length=int(config.get("model_max_length") or 1 << 30),
        **special,
    )
    template = directory / "chat_template.jinja"
    fast.chat_template = template.read_text() if template.is_file() else config.get("chat_template")
    return fast


def _load_auto(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _eos_ids(directory: Path, tok: Any) -> frozenset[int]:
    ids = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((directory / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return frozenset(ids)


def _max_length(directory: Path, tok: Any) -> int:
    """sentence-transformers truncates at ``max_seq_length``; match it."""
    try:
        return int(json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return min(int(getattr(tok, "model_max_length", 512) or 512), 8192)


class Detokenizer:
    """Turns a growing list of token ids into text pieces without splitting a
    multi-byte character or losing the space a token carries (the TGI/vLLM
    prefix-offset method: decode a small window and emit only the new suffix)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-4:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        after = self._tokenizer.decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""
