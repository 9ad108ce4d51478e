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
  (its options) to inject delays and failures, and counters of what it did;
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
from llmk.backend import Backend, BackendOptions, DecodeState, Runner
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
    "FakeState",
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

    #: Seconds slept in every prefill, decode, logits and encode call.
    delay: float = Field(0.0, ge=0.0)
    #: ``Backend.load`` raises.
    fail_load: bool = False
    #: The runner's first call (the kernel's warm-up request) raises.
    fail_warmup: bool = False
    #: Every sequence emits ``</s>`` as its Nth generated token; 0 never does.
    eos_at: int = Field(0, ge=0)
    #: Shifts the next-token function, so that two versions generate differently.
    salt: int = 0
    #: The runner's ``max_context``; ``logits`` refuses longer sequences.
    max_context: int = Field(2048, ge=2)
    #: Bytes the backend estimates before loading and the runner reports holding.
    memory: int = Field(1000, ge=0)
    #: Every logit is NaN: the model loads but fails the kernel's health check.
    nan: bool = False
    #: The runner implements ``merge`` (continuous batching); without it each
    #: admitted group decodes on its own.
    merge: bool = True


class FakeState(DecodeState):
    """Per row: the last token and how many tokens were generated so far."""

    def __init__(self, last: list[int], generated: list[int]):
        self.last = last
        self.generated = generated

    def select(self, rows: list[int]) -> None:
        if len(set(rows)) != len(rows) or any(not 0 <= r < len(self.last) for r in rows):
            raise IndexError(f"select({rows}) on a batch of {len(self.last)}")
        self.last = [self.last[r] for r in rows]
        self.generated = [self.generated[r] for r in rows]


class FakeRunner(Runner):
    """Deterministic logits from the token ids alone, computed with NumPy.

    The next token after ``t`` is ``next_token(t)``, always an ordinary text
    token: its logit is 10 while the others get small varied values (so that
    scoring is not uniform); with ``eos_at=N`` the Nth generated token is ``</s>``.
    ``encode`` returns hidden states that depend only on each token id.
    """

    HIDDEN = 16

    def __init__(self, task: str, options: FakeOptions, vocab: _Vocab):
        self.task = task  # type: ignore[assignment]
        self.device = "cpu"
        self.options = options
        self.max_context = options.max_context
        self.vocab_size = vocab.size
        self.text_ids = vocab.text_ids
        self.eos_id = vocab.ids[EOS_TOKEN]
        self.calls = 0
        #: The batch size of every ``prefill``, in call order.
        self.batch_sizes: list[int] = []
        self.closed = False

    # -- the model -----------------------------------------------------------
    def next_token(self, last: int) -> int:
        return self.text_ids[(last * 7 + 3 + self.options.salt) % len(self.text_ids)]

    def row(self, last: int, generated: int | None = None) -> np.ndarray:
        """The logits that follow token ``last`` (``generated`` tokens in, if decoding)."""
        import numpy as np

        row = ((last * 31 + np.arange(self.vocab_size) * 17) % 11).astype(np.float32) / 4.0
        eos = self.options.eos_at and generated == self.options.eos_at
        row[self.eos_id if eos else self.next_token(last)] = 10.0
        return row * np.float32("nan") if self.options.nan else row

    def _step(self) -> None:
        if self.closed:
            raise RuntimeError("FakeRunner used after close()")
        self.calls += 1
        if self.options.fail_warmup and self.calls == 1:
            raise RuntimeError("fake warm-up failure (fail_warmup=True)")
        if self.options.delay:
            time.sleep(self.options.delay)

    # -- Runner ------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]]) -> tuple[FakeState, np.ndarray]:
        import numpy as np

        self._step()
        if not prompts or any(not p for p in prompts):
            raise ValueError("prefill needs non-empty prompts")
        self.batch_sizes.append(len(prompts))
        state = FakeState([p[-1] for p in prompts], [1] * len(prompts))
        return state, np.stack([self.row(p[-1], 1) for p in prompts])

    def decode(self, state: DecodeState, tokens: list[int]) -> np.ndarray:
        import numpy as np

        assert isinstance(state, FakeState)
        self._step()
        if len(tokens) != len(state.last):
            raise ValueError(f"decode got {len(tokens)} tokens for a batch of {len(state.last)}")
        state.last = list(tokens)
        state.generated = [g + 1 for g in state.generated]
        return np.stack([self.row(t, g) for t, g in zip(state.last, state.generated)])

    def merge(self, states: list[DecodeState]) -> FakeState:
        if not self.options.merge:
            return super().merge(states)
        merged = FakeState([], [])
        for state in states:
            assert isinstance(state, FakeState)
            merged.last += state.last
            merged.generated += state.generated
        return merged

    def logits(self, token_ids: list[int]) -> np.ndarray:
        import numpy as np

        self._step()
        if len(token_ids) > self.max_context:
            raise ValueError(f"{len(token_ids)} tokens exceed the context of {self.max_context}")
        return np.stack([self.row(t) for t in token_ids])

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import numpy as np

        self._step()
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
