"""Training data: mlx-lm's jsonl formats -> (prompt, answer, end) examples -> padded batches.

Formats (one per line, as mlx_lm.lora reads them):
- chat: {"messages": [...]}: the prompt is the chat template over all but the last
  message with an open model turn; the answer is the last message's content, ended by
  `<turn|>` (the model's end of turn, an EOS id of the release);
- completions: {"prompt": ..., "completion": ...}: the same, with one user turn;
- text: {"text": ...}: the prompt is `<bos>`, the answer the text, ended by the first EOS.
The answer is always the trained block text; the sampler writes it on whole canvases.
"""

import json
import math
from pathlib import Path
from typing import Iterator, List, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from .losses import Batch, Draws, Objective, sample_draws


class Example(NamedTuple):
    prompt: List[int]
    answer: List[int]
    end: int  # the EOS id written after the answer


def n_canvases(example: Example, C: int) -> int:
    return math.ceil((len(example.answer) + 1) / C)


def example_length(example: Example, C: int) -> int:
    """Encoder length of the example: prompt plus whole canvases of answer + EOS + pad."""
    return len(example.prompt) + n_canvases(example, C) * C


def _end_of_turn(tokenizer) -> int:
    ids = tokenizer.encode("<turn|>")
    eos = tokenizer.eos_token_ids
    if len(ids) == 1 and ids[0] in eos:
        return ids[0]
    if not eos:
        raise ValueError("The tokenizer has no EOS id; set eos_token_id in generation_config.json.")
    return eos[0]


def _checked(prompt: List[int], tokenizer) -> List[int]:
    """`prompt`, refused where its rendering holds text the vocabulary cannot hold (a chat
    template's markers, say, that become the unknown token)."""
    bad = tokenizer.unknown_ids(prompt)
    if bad:
        raise ValueError(
            f"the rendered prompt holds the unknown token at position {bad[0]} (a chat "
            "template marker or text this vocabulary lacks); fix the chat template or the text"
        )
    return prompt


def example_from_record(record: dict, tokenizer) -> Example:
    """One jsonl record in chat, completions or text format."""
    if "messages" in record:
        messages = record["messages"]
        if not messages or messages[-1].get("role") not in ("assistant", "model"):
            raise ValueError("a chat record must end with an assistant message")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
        answer = tokenizer.encode(messages[-1]["content"])
        return Example(_checked(prompt, tokenizer), answer, _end_of_turn(tokenizer))
    if "prompt" in record and "completion" in record:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}], add_generation_prompt=True
        )
        answer = tokenizer.encode(record["completion"])
        return Example(_checked(prompt, tokenizer), answer, _end_of_turn(tokenizer))
    if "text" in record:
        eos = tokenizer.eos_token_ids
        if not eos:
            raise ValueError("text records need an EOS id in generation_config.json")
        return Example([tokenizer.bos_token_id], tokenizer.encode(record["text"]), eos[0])
    raise ValueError(
        f"unknown record keys {sorted(record)}; use 'messages' (chat), 'prompt'+'completion' "
        "(completions) or 'text'"
    )


def prompt_from_record(record: dict, tokenizer) -> List[int]:
    """The prompt of one jsonl record, rendered as the generate command renders a user
    message: chat records without their last assistant turn (if any), completions
    records with or without a completion (distillation needs prompts only)."""
    if "messages" in record:
        messages = list(record["messages"])
        if messages and messages[-1].get("role") in ("assistant", "model"):
            messages = messages[:-1]
        if not messages:
            raise ValueError("a chat record needs a message before the assistant's")
        return _checked(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True), tokenizer
        )
    if isinstance(record.get("prompt"), str):
        user = [{"role": "user", "content": record["prompt"]}]
        return _checked(tokenizer.apply_chat_template(user, add_generation_prompt=True), tokenizer)
    raise ValueError(
        f"no prompt in a record with keys {sorted(record)}; use 'messages' (chat) or "
        "'prompt' (completions)"
    )


def load_jsonl(path: Path, tokenizer, parse=None) -> list:
    """The records of a jsonl file, each through `parse` (default: a training example)."""
    parse = parse or example_from_record
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line), tokenizer))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}, line {i + 1}: {e}") from None
    return out


def load_dataset(data_dir, tokenizer, names=("train", "valid", "test")):
    """{name: examples} for each `name.jsonl` in `data_dir` (missing files: empty lists)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"--data {data_dir} is not a folder; pass one with train/valid/test.jsonl."
        )
    return {
        n: load_jsonl(data_dir / f"{n}.jsonl", tokenizer)
        if (data_dir / f"{n}.jsonl").exists()
        else []
        for n in names
    }


def make_batch(examples: Sequence[Example], C: int, pad_id: int, pad_to: int = 32) -> Batch:
    """Right-padded batch; T is rounded up to a multiple of `pad_to` (fewer compiled shapes)."""
    lengths = [example_length(e, C) for e in examples]
    T = pad_to * math.ceil(max(lengths) / pad_to)
    tokens = np.full((len(examples), T), pad_id, dtype=np.int32)
    for row, e in zip(tokens, examples):
        seq = e.prompt + e.answer + [e.end]
        row[: len(seq)] = seq
    return Batch(
        mx.array(tokens),
        mx.array([len(e.prompt) for e in examples], dtype=mx.int32),
        mx.array([len(e.prompt) + len(e.answer) + 1 for e in examples], dtype=mx.int32),
        mx.array([n_canvases(e, C) for e in examples], dtype=mx.int32),
    )


def check_lengths(examples: Sequence[Example], C: int, max_seq_length: int, name: str) -> None:
    """Raise on examples whose prompt + answer canvases exceed `max_seq_length`."""
    for i, e in enumerate(examples):
        n = example_length(e, C)
        if n > max_seq_length:
            raise ValueError(
                f"{name} example {i + 1} needs {n} tokens (prompt + answer canvases) > "
                f"--max-seq-length {max_seq_length}; raise it or shorten the example."
            )


class BatchIterator:
    """`iterate_batches` for mlx-lm's trainer: batches plus the objective's draws.

    Batches group examples of similar length (mlx-lm's sort-then-shuffle). Training draws
    come from `mx.random.key(seed)` split per batch; a non-looping pass (validation, test)
    restarts from the same key, so its loss is comparable between evaluations.
    """

    def __init__(self, model, pad_id: int, objective: Objective, seed: int = 0, pad_to: int = 32):
        self.pad_to = pad_to
        self.C = model.args.canvas_length
        self.V = model.args.vocab_size
        self.pad_id = pad_id
        self.objective = objective
        self.seed = seed

    def __call__(
        self, dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None
    ) -> Iterator[tuple]:
        if len(dataset) < batch_size:
            raise ValueError(
                f"The dataset has {len(dataset)} examples, fewer than --batch-size {batch_size}."
            )
        order = sorted(range(len(dataset)), key=lambda i: example_length(dataset[i], self.C))
        batches = [
            order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
        rng = np.random.default_rng(self.seed if seed is None else seed)
        key = mx.random.key(self.seed + (0 if loop else 1))
        while True:
            for b in rng.permutation(len(batches)) if loop else range(len(batches)):
                key, sub = mx.random.split(key)
                examples = [dataset[j] for j in batches[b]]
                batch = make_batch(examples, self.C, self.pad_id, self.pad_to)
                draws = sample_draws(sub, batch.n_canvases, self.C, self.V, self.objective)
                yield (*batch, *draws)
            if not loop:
                break


def split_batch(arrays: Sequence[mx.array]):
    """(Batch, Draws) from the flat tuple `BatchIterator` yields."""
    n = len(Batch._fields)
    return Batch(*arrays[:n]), Draws(*arrays[n:])
