"""Talk to `make serve` (vllm-indexcache serve) with the `openai` package: a chat completion, then the same streamed.

    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--prompt "..."]
"""
from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="Tell me of the sea.")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.prompt}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                           temperature=0)
    print(f"[{model}] {reply.choices[0].message.content}\n--- streamed ---")
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
