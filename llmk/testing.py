"""Test helpers for llmk and for plugin authors: a pytest plugin, opt-in with

```python
# conftest.py
pytest_plugins = ["llmk.testing"]
```

It gives you:

- tiny real models built offline in a second or two (no model hub):
  ``build_tiny_tokenizer``, ``build_tiny_llama`` and ``build_tiny_bert``, and the
  session fixtures ``tiny_tokenizer``, ``tiny_llama`` and ``tiny_bert`` (their directories);
- ``FakeBackend``: a deterministic backend written with NumPy only, with knobs
  (its options) to inject delays and failures, and counters of what it did. Its
  runner keeps the step contract for real: its KV cache holds token ids, its
  logits depend on what it reads back, and ``runner.expected(prompt, n)`` is the
  greedy completion an engine must produce (paged or ``contiguous`` layout);
- ``FakePlugin`` / the ``fake_plugin`` fixture: registers ``FakeBackend`` and
  resolves the sources ``fake:NAME`` (a model that generates) and
  ``fake-embed:NAME`` (a model that embeds);
- ``kernel``: a fresh ``Kernel`` per test, with its own cache directory, only
  llmk's built-in plugins plus the fake one.

Importing this module is cheap: torch, transformers and tokenizers are imported
only by the builders that need them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from pydantic import Field

from llmk.artifact import Artifact
from llmk.backend import Backend, BackendOptions, KVLayout, Runner, SequenceStep
from llmk.cache import Cache, key_digest
from llmk.errors import SourceError
from llmk.hookspecs import hookimpl

if TYPE_CHECKING:
    import numpy as np

    from llmk.kernel import Kernel
    from llmk.plugins import Registry

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "FakeBackend",
    "FakeOptions",
    "FakePlugin",
    "FakeRunner",
    "build_tiny_bert",
    "build_tiny_llama",
    "build_tiny_tokenizer",
    "load_fake",
    "tiny_corpus",
]

# -- a small English corpus, built in ------------------------------------------------

_SENTENCES = """\
The capital of France is Paris, and the capital of Italy is Rome.
Once upon a time there was a little fox who lived at the edge of a forest.
Every morning the fox walked down to the river to drink the cold clear water.
The river ran past the village, where the baker opened his shop before sunrise.
People came from the hills to buy warm bread, sweet cakes and fresh milk.
In the evening the children played in the square until their mothers called them home.
The old clock on the tower struck seven, and the lamps were lit one by one.
A good model of language predicts the next word from the words that came before it.
Small models are fast, large models know more, and every model makes mistakes.
Please write a short answer, then explain how you found it, step by step.
The weather today is sunny with a light wind from the west and no rain.
She opened the window, looked at the garden and smiled at the first flowers of spring.
He read the letter twice before he understood what his brother wanted to say.
The train to the coast leaves at nine and arrives a little after noon.
We should test every part of the system, because the part we skip is the part that breaks.
Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale.
The first rule of the kitchen is to clean as you go, and the second is to taste everything.
Hello! How are you? I am fine, thank you, and I hope you are well too.
The library is quiet in the afternoon, when most students have gone to the lake.
Numbers like one, two, three, four and five are easy; counting to a million takes longer.
"""

_SUBJECTS = ("The cat", "A dog", "My friend", "The old man", "Our teacher", "The little bird", "A young girl",
             "The farmer", "The doctor", "Her brother")
_VERBS = (("walks to", "walked to"), ("looks at", "looked at"), ("thinks about", "thought about"),
          ("runs past", "ran past"), ("sings near", "sang near"), ("reads beside", "read beside"),
          ("sleeps under", "slept under"), ("waits for", "waited for"), ("paints", "painted"))
_OBJECTS = ("the river", "a big tree", "the quiet house", "the market", "the green hill", "a small boat",
            "the city", "the red door")


def tiny_corpus() -> list[str]:
    """A few hundred lines of plain English text, the same on every machine."""
    lines = _SENTENCES.splitlines()
    for i, subject in enumerate(_SUBJECTS):
        for j, (present, past) in enumerate(_VERBS):
            obj = _OBJECTS[(i + j) % len(_OBJECTS)]
            other = _OBJECTS[(i * 3 + j) % len(_OBJECTS)]
            lines.append(f"{subject} {present} {obj} every day, and then goes back to {other}.")
            lines.append(f"Yesterday {subject.lower()} {past} {other} while the sun was high.")
    return lines


# -- tiny real models ------------------------------------------------------------

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)  # ids 0..4, in this order
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(directory: str | Path, *, vocab_size: int = 480, model_max_length: int = 256) -> Path:
    """Train a byte-level BPE tokenizer on ``tiny_corpus()`` (offline, ~10 ms) and
    save it, with bos/eos/pad tokens and a ChatML-like chat template, as a
    Hugging Face fast tokenizer in ``directory``. Encoding adds ``<s>`` in front."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END], model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def build_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads,
    context 256) with the tiny tokenizer, saved as safetensors in ``directory``.

    The output weights of special tokens and of byte tokens that are not
    printable ASCII are zero, so greedy decoding never ends early on ``</s>``
    and produces readable text: tests decide where a completion stops.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = build_tiny_tokenizer(directory)
    vocab = _read_vocab(directory)
    ids = {name: vocab.ids[name] for name in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)}
    config = LlamaConfig(
        vocab_size=vocab.size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False,
        bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN],
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    silent = sorted(set(range(vocab.size)) - set(vocab.text_ids))
    with torch.no_grad():
        model.lm_head.weight[silent] = 0.0
    model.save_pretrained(str(directory), safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN]
    ).save_pretrained(str(directory))
    return directory


def build_tiny_bert(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random ``BertModel`` (hidden 32, 2 layers) with a WordPiece tokenizer
    trained offline, laid out like a sentence-transformers model (``modules.json``,
    mean pooling, normalization, ``max_seq_length`` 128) with safetensors weights."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        tiny_corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
    fast.save_pretrained(str(directory))
    hidden = 32
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.token_to_id("[PAD]"),
        architectures=["BertModel"],
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(str(directory), safe_serialization=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (directory / "2_Normalize").mkdir(exist_ok=True)
    return directory


class _Vocab:
    """What a byte-level BPE ``tokenizer.json`` holds, read without any ML framework."""

    def __init__(self, ids: dict[str, int], special: set[str]):
        self.ids = ids
        self.size = max(ids.values()) + 1
        #: ids of ordinary tokens that decode to printable ASCII (U+0120 is the
        #: byte-level stand-in for a space), in id order.
        self.text_ids = sorted(
            i for token, i in ids.items()
            if token not in special and all(33 <= ord(c) <= 126 or c == "\u0120" for c in token)
        )


def _read_vocab(directory: Path) -> _Vocab:
    data = json.loads((Path(directory) / "tokenizer.json").read_text())
    ids = dict(data["model"]["vocab"])
    special = set()
    for added in data.get("added_tokens", []):
        ids[added["content"]] = added["id"]
        special.add(added["content"])
    return _Vocab(ids, special)


# -- a fake backend --------------------------------------------------------------


class FakeOptions(BackendOptions):
    """Knobs of ``FakeBackend``, given as ``kernel.load(..., options={...})``."""

    #: Seconds slept in every forward, logits and encode call.
    delay: float = Field(0.0, ge=0.0)
    #: ``Backend.load`` raises.
    fail_load: bool = False
    #: The runner's first call (the kernel's warm-up request) raises.
    fail_warmup: bool = False
    #: ``forward`` raises when a step feeds this token id (-1: never).
    fail_on_token: int = -1
    #: ``forward`` blocks for an hour when a step feeds this token id (-1: never): a stuck engine.
    hang_on_token: int = -1
    #: Every sequence emits ``</s>`` as its Nth generated token; 0 never does.
    eos_at: int = Field(0, ge=0)
    #: Shifts the next-token function, so that two versions generate differently.
    salt: int = 0
    #: The runner's ``max_context``; ``logits`` refuses longer sequences.
    max_context: int = Field(2048, ge=2)
    #: Bytes the backend estimates before loading and the runner reports holding.
    memory: int = Field(1000, ge=0)
    #: KV cache bytes per token position (what the engine counts for its cache).
    kv_bytes_per_token: int = Field(0, ge=0)
    #: Every logit is NaN: the model loads but fails the kernel's health check.
    nan: bool = False
    #: The next token depends on this many of the last tokens (read back from the KV
    #: cache): large makes every position matter; small keeps scoring in windows exact.
    memory_span: int = Field(8, ge=1)
    #: The KV cache's block size (small, so that short prompts span several blocks).
    block_size: int = Field(4, ge=1)
    #: A contiguous KV layout (one slot per sequence, prefixes copied between slots)
    #: instead of a paged one.
    contiguous: bool = False


UNWRITTEN = -1  # what the fake cache holds where nothing was written (or a block was released)


class FakeRunner(Runner):
    """Deterministic logits computed with NumPy from what its KV cache holds.

    The cache stores token ids: ``forward`` writes each step's tokens at their
    positions through the block table, then reads every position it attends to
    back from the cache. The next token depends on the last ``memory_span``
    tokens read, so a wrong block, position or stale prefix within that span
    changes the output, and reading a position nothing wrote raises.
    ``expected(prompt, n)`` is the greedy continuation computed without any
    cache: what the engine must produce. The winning logit is 10; the others get
    small varied values, so that scoring is not uniform; with ``eos_at=N`` the
    Nth generated token is ``</s>``. ``encode`` returns hidden states that depend
    only on each token id.
    """

    HIDDEN = 16

    def __init__(self, task: str, options: FakeOptions, vocab: _Vocab):
        self.task = task  # type: ignore[assignment]
        self.device = "cpu"
        self.options = options
        self.max_context = options.max_context
        self.kv_layout = KVLayout(bytes_per_token=options.kv_bytes_per_token, block_size=options.block_size,
                                  contiguous=options.contiguous)
        self.vocab_size = vocab.size
        self.text_ids = vocab.text_ids
        self.eos_id = vocab.ids[EOS_TOKEN]
        self.cache: np.ndarray | None = None  # [num_blocks, block_size] token ids
        self.calls = 0
        #: Every forward's steps as (slot, start, token count, logits), in call order.
        self.steps: list[list[tuple[int, int, int, int]]] = []
        self.copies: list[tuple[int, int]] = []
        self.closed = False
        # For eos_at: the position whose logits give each sequence's first generated token. A
        # sequence is told apart by its block table, the same list object for its whole life.
        self._tables: dict[int, list[int]] = {}
        self._prompt_end: dict[int, int] = {}

    # -- the model -----------------------------------------------------------
    def next_token(self, context: Sequence[int]) -> int:
        recent = context[-self.options.memory_span:]
        checksum = (len(recent) * 5 + sum(recent) * 13) % 101
        return self.text_ids[(context[-1] * 7 + 3 + self.options.salt + checksum) % len(self.text_ids)]

    def row(self, context: Sequence[int], generated: int | None = None) -> np.ndarray:
        """The logits after ``context`` (whose next token would be the ``generated``-th generated one)."""
        import numpy as np

        last = context[-1]
        row = ((last * 31 + np.arange(self.vocab_size) * 17) % 11).astype(np.float32) / 4.0
        eos = self.options.eos_at and generated == self.options.eos_at
        row[self.eos_id if eos else self.next_token(context)] = 10.0
        return row * np.float32("nan") if self.options.nan else row

    def expected(self, prompt: Sequence[int], max_tokens: int) -> list[int]:
        """The greedy completion of ``prompt`` (at most ``max_tokens``, ending at ``</s>``)."""
        import numpy as np

        context, out = list(prompt), []
        while len(out) < max_tokens and len(context) < self.max_context:
            token = int(np.argmax(self.row(context, len(out) + 1)))
            out.append(token)
            context.append(token)
            if token == self.eos_id:
                break
        return out

    def _call(self) -> None:
        if self.closed:
            raise RuntimeError("FakeRunner used after close()")
        self.calls += 1
        if self.options.fail_warmup and self.calls == 1:
            raise RuntimeError("fake warm-up failure (fail_warmup=True)")
        if self.options.delay:
            time.sleep(self.options.delay)

    # -- Runner ------------------------------------------------------------------
    def allocate_cache(self, num_blocks: int, num_slots: int, capacity_blocks: int | None = None) -> None:
        import numpy as np

        self.cache = np.full((num_blocks, self.options.block_size), UNWRITTEN, dtype=np.int64)
        self.num_slots = num_slots

    def forward(self, steps: list[SequenceStep]) -> np.ndarray:
        import numpy as np

        self._call()
        if self.cache is None:
            raise RuntimeError("forward before allocate_cache")
        if len({s.slot for s in steps}) != len(steps):
            raise ValueError(f"two steps share a slot: {[s.slot for s in steps]}")
        if any(self.options.hang_on_token in s.tokens for s in steps):
            time.sleep(3600)
        if any(self.options.fail_on_token in s.tokens for s in steps):
            raise ValueError(f"fake failure: a step fed token {self.options.fail_on_token} (fail_on_token)")
        self.steps.append([(s.slot, s.start, len(s.tokens), s.logits) for s in steps])
        size = self.options.block_size
        rows = []
        for step in steps:
            if not step.tokens or step.logits > len(step.tokens) or not 0 <= step.slot < self.num_slots:
                raise ValueError(f"bad step {step}")
            end = step.start + len(step.tokens)
            if len(step.blocks) * size < end:
                raise ValueError(f"the block table {step.blocks} does not cover {end} positions")
            if self._tables.get(step.slot) is not step.blocks:  # a new sequence in this slot
                self._tables[step.slot] = step.blocks
                self._prompt_end.pop(step.slot, None)
            for offset, token in enumerate(step.tokens):
                position = step.start + offset
                self.cache[step.blocks[position // size], position % size] = token
            context = [int(self.cache[step.blocks[p // size], p % size]) for p in range(end)]
            if UNWRITTEN in context:
                raise ValueError(f"slot {step.slot} read position {context.index(UNWRITTEN)}, which holds nothing")
            if step.logits and step.slot not in self._prompt_end:
                self._prompt_end[step.slot] = end - 1
            for position in range(end - step.logits, end):
                rows.append(self.row(context[:position + 1], position - self._prompt_end[step.slot] + 1))
        vocab = self.vocab_size
        return np.stack(rows) if rows else np.zeros((0, vocab), dtype=np.float32)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        assert self.cache is not None
        for source, target in pairs:
            self.cache[target] = self.cache[source]
        self.copies.extend(pairs)

    def release_blocks(self, blocks: list[int]) -> None:
        assert self.cache is not None
        self.cache[blocks] = UNWRITTEN

    def logits(self, token_ids: list[int]) -> np.ndarray:
        import numpy as np

        self._call()
        if len(token_ids) > self.max_context:
            raise ValueError(f"{len(token_ids)} tokens exceed the context of {self.max_context}")
        return np.stack([self.row(token_ids[:p + 1]) for p in range(len(token_ids))])

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import numpy as np

        self._call()
        ids = np.asarray(input_ids, dtype=np.float32)[:, :, None]
        hidden = np.sin((ids + 1.0) * (np.arange(self.HIDDEN, dtype=np.float32) + 1.0) * 0.37)
        # Padding gets loud garbage: pooling that ignores the mask shows up at once.
        return np.where(np.asarray(attention_mask)[:, :, None] > 0, hidden, 1000.0).astype(np.float32)

    def memory_bytes(self) -> int:
        return 0 if self.closed else self.options.memory

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with FakeBackend.lock:
                FakeBackend.closes += 1


class FakeBackend(Backend):
    """A backend for tests: deterministic, instant, no ML framework.

    It serves artifacts of format ``fake`` (a small JSON file that ``export``
    writes from the tokenizer-only ``hf`` artifact of a ``fake:`` source).
    Class counters (``loads``, ``exports``, ``closes``, ``runners``) record
    what happened; ``reset()`` zeroes them (the ``fake_plugin`` fixture does).
    """

    name = "fake"
    artifact_format = "fake"
    tasks = frozenset({"generate", "embed"})
    speed_rank: ClassVar[dict[str, int]] = {"cpu": 1}
    Options = FakeOptions

    lock: ClassVar[threading.Lock] = threading.Lock()
    loads: ClassVar[int] = 0
    exports: ClassVar[int] = 0
    closes: ClassVar[int] = 0
    runners: ClassVar[list[FakeRunner]] = []

    @classmethod
    def reset(cls) -> None:
        with FakeBackend.lock:
            FakeBackend.loads = FakeBackend.exports = FakeBackend.closes = 0
            FakeBackend.runners = []

    def export(self, source: Artifact, out_dir: Path, *, dtype: str) -> None:
        with FakeBackend.lock:
            FakeBackend.exports += 1
        (out_dir / "fake-model.json").write_text(
            json.dumps({"source": source.source, "task": source.task, "dtype": dtype, "backend": self.name})
        )

    def estimate_memory(self, artifact: Artifact, *, device: str, dtype: str, options: BackendOptions) -> int:
        assert isinstance(options, FakeOptions)
        return options.memory

    def load(self, artifact: Artifact, *, device: str, dtype: str, options: BackendOptions, cache: Cache) -> Runner:
        assert isinstance(options, FakeOptions)
        with FakeBackend.lock:
            FakeBackend.loads += 1
        if options.fail_load:
            raise RuntimeError("fake load failure (fail_load=True)")
        manifest = artifact.path / "fake-model.json"
        if artifact.format != self.artifact_format or not manifest.is_file():
            raise SourceError(artifact.source, f"{artifact.path} is not a fake-model artifact")
        runner = FakeRunner(artifact.task, options, _read_vocab(artifact.tokenizer_dir))
        with FakeBackend.lock:
            FakeBackend.runners.append(runner)
        return runner


FAKE_SCHEMES = {"fake:": "generate", "fake-embed:": "embed"}


class FakePlugin:
    """An llmk plugin object: registers ``backends`` (default: ``FakeBackend``) and
    resolves ``fake:NAME`` / ``fake-embed:NAME`` to a model whose only files are
    the tiny tokenizer's (``tokenizer_dir``, or built once into the kernel's cache)."""

    def __init__(self, tokenizer_dir: str | Path | None = None,
                 backends: Sequence[type[Backend]] = (FakeBackend,), name: str = "llmk-fake"):
        self.__name__ = name  # the name the kernel registers this plugin under
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.backends = tuple(backends)

    @hookimpl
    def register_backends(self, register: Registry) -> None:
        for backend in self.backends:
            register.add(backend)

    @hookimpl
    def resolve_source(self, source: str, cache: Cache) -> Artifact | None:
        scheme = next((s for s in FAKE_SCHEMES if source.startswith(s)), None)
        if scheme is None:
            return None
        if not source[len(scheme):]:
            raise SourceError(source, f"expected {scheme}NAME")
        directory = self.tokenizer_dir or cache.build("sources", "llmk-fake-tokenizer", build_tiny_tokenizer,
                                                      describe="the fake model's tokenizer")
        return Artifact(source=source, path=directory, format="hf", task=FAKE_SCHEMES[scheme],  # type: ignore[arg-type]
                        tokenizer_dir=directory, digest_fn=lambda: key_digest("llmk-fake", source))


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the tiny byte-level BPE tokenizer (built once per session)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random Llama chat model (built once per session)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random sentence-embedding BERT (built once per session)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def fake_plugin(tiny_tokenizer: Path) -> FakePlugin:
    """A fresh ``FakePlugin``; ``FakeBackend``'s counters start at zero."""
    FakeBackend.reset()
    return FakePlugin(tiny_tokenizer)


@pytest.fixture
def kernel(fake_plugin: FakePlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    """A fresh ``Kernel``: own cache directory, built-in plugins plus ``fake_plugin``,
    no third-party autoload, whatever the environment says; closed after the test."""
    from llmk.kernel import Kernel

    for variable in ("LLMK_DISABLE_PLUGINS", "LLMK_DISABLE_PLUGIN_AUTOLOAD", "LLMK_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    kernel = Kernel(plugins=[fake_plugin], autoload=False, cache_dir=tmp_path / "llmk-cache", drain_timeout=10.0)
    yield kernel
    kernel.close()


def load_fake(kernel: Kernel, name: str = "fake", source: str | None = None, **fields: Any):
    """``kernel.load(name, source="fake:NAME", backend="fake", ...)``; ``fields`` win."""
    return kernel.load(name, source or f"fake:{name}", **{"backend": "fake", **fields})
