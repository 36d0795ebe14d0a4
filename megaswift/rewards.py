"""Built-in reward functions for `grpo.reward_funcs` (rollout/rewards.py has the calling
convention): name them `megaswift.rewards:accuracy` and so on.

- accuracy        1 when the completion's final answer equals the row's `answer` column, else 0
                  (None for rows without one). The final answer is the last \\boxed{...} if
                  there is one, else the last number; numbers compare by value ("1,000" = "1000.0").
- answer_format   1 when a final answer can be read off the completion: a \\boxed{...}, or a
                  number that ends it.
- think_format    1 for DeepSeek-R1's shape: one <think>...</think> block, then the answer.
- length_penalty  DAPO's soft overlong penalty (Yu et al. 2025): 0 up to max_new_tokens - L/4
                  tokens, falling linearly to -1 at max_new_tokens (L = max_new_tokens).
"""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THINK = re.compile(r"^\s*<think>(?!.*<think>).*?</think>\s*\S", re.DOTALL)


def text_of(completion) -> str:
    """The completion's text: a string, or the content of a message list's last message."""
    if isinstance(completion, list):
        return completion[-1].get("content", "") if completion else ""
    return completion


def _boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None


def final_answer(text: str) -> str | None:
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _same(a: str, b) -> bool:
    b = str(b).strip()
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return a.strip() == b


def accuracy(completions, answer=None, **kwargs) -> list[float | None]:
    if answer is None:
        return [None] * len(completions)
    out = []
    for c, want in zip(completions, answer):
        if want is None:
            out.append(None)
            continue
        got = final_answer(text_of(c))
        out.append(1.0 if got is not None and _same(got, want) else 0.0)
    return out


def answer_format(completions, **kwargs) -> list[float]:
    out = []
    for c in completions:
        text = text_of(c).strip()
        ends_in_number = bool(re.search(r"(?:-?\d[\d,]*(?:\.\d+)?)\W*$", text))
        out.append(1.0 if _boxed(text) is not None or ends_in_number else 0.0)
    return out


def think_format(completions, **kwargs) -> list[float]:
    return [1.0 if _THINK.match(text_of(c)) else 0.0 for c in completions]


def length_penalty(completions, completion_ids, max_new_tokens, **kwargs) -> list[float]:
    budget = max(1, max_new_tokens // 4)
    free = max_new_tokens - budget
    return [max(-1.0, min(0.0, (free - len(ids)) / budget)) for ids in completion_ids]
