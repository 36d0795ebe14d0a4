"""tokenize_chat: a conversation rendered by the tokenizer's own chat template, with a flag on
every token the model should learn to produce (the assistant turns).

The template is the only authority on the text, so we never re-implement it: we render growing
prefixes of the conversation and read each assistant turn's character span off the difference,
then map characters to tokens with the fast tokenizer's offsets.
"""
from __future__ import annotations

from megaswift.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def tokenize_chat(row: dict, tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of `row["messages"]` and, per token, whether it belongs to an assistant turn:
    the content and the end-of-turn tokens after it (so the model learns to stop), not the
    `<|im_start|>assistant\\n`-style header, which the prompt supplies at inference."""
    messages = check_messages(row, where)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                        "loss masks need its character offsets (ship a tokenizer.json)")
    text, spans = assistant_spans(messages, tokenizer, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    flags, k = [], 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        # A token belongs to the turn its first character belongs to; zero-width tokens to none.
        flags.append(end > start and k < len(spans) and spans[k][0] <= start)
    return ids, flags


def check_messages(row, where: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(row, dict) or "messages" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: expected a row {{\"messages\": [...]}}, got keys {keys}")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{role, content}}, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object {{role, content}}, got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] content must be a string, got {m.get('content')!r:.80}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on; add one or drop the row")
    return messages


def assistant_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, where)
        upto = _render(tokenizer, messages[: i + 1], False, where)
        if not upto.startswith(prompt) or not full.startswith(upto):
            # e.g. templates that drop the reasoning of earlier turns render a turn differently
            # once later turns follow it, so no single token sequence carries every turn's loss.
            raise DataError(f"{where}: the chat template cannot be split into turns: the rendering up to "
                            f"messages[{i}] is not a prefix of the rendering that continues it; "
                            "use a template that renders each turn the same way regardless of what follows")
        # Trailing whitespace after the end-of-turn token (the template's "\n" between turns)
        # is not something the model must produce before stopping.
        spans.append((len(prompt), max(len(prompt), len(upto.rstrip()))))
    return full, spans


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises whatever the template's author chose
        raise DataError(f"{where}: the tokenizer's chat template failed: {type(e).__name__}: {e}") from e
