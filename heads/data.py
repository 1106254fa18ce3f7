"""Training data for heads: prompts (with the responses that follow them) read from JSONL or plain text,
tokenized, and cut into training sequences.

Prompts and responses stay apart so that self-distillation can replace a response with the target's own,
and held-out prompts can be given to the target alone to measure acceptance.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

MIN_LENGTH = 3  # a shorter sequence holds no (feature, token, token-after-next) triple to learn from
KEYS = ("prompt", "text", "messages")


@dataclass
class Example:
    prompt: list[int]
    response: list[int]


def _records(source):
    """(where, record) pairs of one source: a record dict, a JSONL file, or a plain text file (one record
    per paragraph)."""
    if isinstance(source, dict):
        return [("a record passed to train()", source)]
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {str(path)!r} cannot be read ({e}); pass a readable UTF-8 JSONL or text file.") from e
    if not text.strip():
        raise ValueError(f"--data {str(path)!r} is empty; pass a file that holds prompts or text.")
    if path.suffix != ".jsonl":
        return [(f"--data {str(path)!r}", {"text": p.strip()}) for p in re.split(r"\n\s*\n", text) if p.strip()]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data {str(path)!r}, line {n}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg}); write one JSON object per line.") from e
    return records


def _conversation(messages, tokenizer) -> tuple[str, str, bool]:
    """The conversation up to its last assistant turn (as a prompt awaiting that turn), and that turn; the
    flag says whether the chat template already wrote the special tokens."""
    reply = messages[-1]["role"] == "assistant"
    context = messages[:-1] if reply else messages
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False) if reply else prompt
        return prompt, full[len(prompt):] if full.startswith(prompt) else messages[-1]["content"], True
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in context) + "assistant: "
    return prompt, messages[-1]["content"] + "\n" if reply else "", False


def _texts(record, tokenizer, where) -> tuple[str, str, bool]:
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"] and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in record["messages"]
    ):
        return _conversation(record["messages"], tokenizer)
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return record["prompt"], str(record.get("response") or record.get("completion") or ""), False
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"], "", False
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"{where}: expected an object with a string \"prompt\" (and optionally \"response\" or \"completion\"), "
        f"a string \"text\", or \"messages\" (a list of {{\"role\", \"content\"}}); got {found}."
    )


def read(sources, tokenizer) -> list[Example]:
    """Tokenized examples from ``sources``: paths of JSONL or text files, or record dicts as a JSONL line holds."""
    examples = []
    for source in sources:
        if not isinstance(source, (dict, str, os.PathLike)):
            raise TypeError(f"Each data source must be a file path or a record dict, got {type(source).__name__}.")
        for where, record in _records(source):
            prompt, response, templated = _texts(record, tokenizer, where)
            examples.append(Example(tokenizer(prompt, add_special_tokens=not templated)["input_ids"],
                                    tokenizer(response, add_special_tokens=False)["input_ids"] if response else []))
    return examples


def sequences(examples: list[Example], max_length: int) -> list[list[int]]:
    """Each example's prompt + response cut into pieces of at most ``max_length`` tokens."""
    out = []
    for ex in examples:
        tokens = ex.prompt + ex.response
        out += [tokens[i : i + max_length] for i in range(0, len(tokens), max_length)]
    return [s for s in out if len(s) >= MIN_LENGTH]
