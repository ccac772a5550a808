"""Talk to a QuantEase model served by vLLM with the official ``openai`` client.

Start a server first, e.g. ``python serving/launch.py CKPT --eager --port 8000``, then::

    python serving/client_example.py --base-url http://127.0.0.1:8000/v1

Shows the three calls an application needs: a plain completion (with logprobs), a chat
completion (the server applies the model's chat template), and a streamed chat
completion printed token by token. The model name is taken from ``/v1/models`` unless
``--model`` is given. vLLM ignores the API key; the client requires one, so any string
works.
"""

from __future__ import annotations

import argparse
import sys

from openai import OpenAI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", help="served model name (default: the first one listed)")
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args(argv)

    client = OpenAI(base_url=a.base_url, api_key="EMPTY", timeout=300.0)
    model = a.model or client.models.list().data[0].id
    print(f"model: {model}")

    # 1. Completion: raw text continuation; logprobs=2 returns the top-2 candidates per token.
    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0.0, logprobs=2
    )
    choice = completion.choices[0]
    print(f"\ncompletion: {choice.text!r} (finish: {choice.finish_reason})")
    for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs):
        print(f"  {token!r:>12}  top-2: {', '.join(f'{t!r} {lp:.2f}' for t, lp in top.items())}")

    # 2. Chat: messages in, the server renders them with the model's chat template.
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=a.max_tokens, temperature=0.0
    )
    print(f"\nchat: {chat.choices[0].message.content!r}")
    print(f"  usage: {chat.usage.prompt_tokens} prompt + {chat.usage.completion_tokens} completion tokens")

    # 3. Streaming chat: deltas arrive as they are generated; stop ends at a string.
    print("\nstreamed chat: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "List three fruits, comma separated."}],
        max_tokens=a.max_tokens,
        temperature=0.0,
        stop=["\n\n"],
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
