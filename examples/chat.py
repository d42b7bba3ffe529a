"""A multi-turn chat that keeps the prompt cache between turns.

Each turn renders the whole conversation with the chat template and encodes only the
ids past those the cache holds (the previous answer's last canvas, which is never encoded
while generating, and the new user turn); where the template renders the history
differently from what the cache holds (it drops or rewrites answers), the conversation is
encoded afresh. Works with any chat template, the Sudoku toy's included.

    python examples/chat.py CHECKPOINT        (then type messages; Ctrl-D ends)
"""

import sys

from mlx_diffgemma import PromptCache, load, stream_generate

model, tokenizer = load(sys.argv[1])
cache = PromptCache(model)
for line in sys.stdin:
    if not line.strip():
        continue
    # With a cache that holds the conversation, pass only the new messages.
    messages = [{"role": "user", "content": line.strip()}]
    for r in stream_generate(model, tokenizer, messages, prompt_cache=cache, seed=0):
        print(r.text, end="", flush=True)
    print(f"\n[encoded {r.prompt_tokens} new tokens; the cache holds {cache.offset}]")
