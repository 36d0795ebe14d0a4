"""Reward functions: loading `module:function` / `path/to/file.py:function` plugins and calling
them with TRL's convention.

Each function is called once per rollout batch as

    fn(prompts=[...], completions=[...], completion_ids=[...], max_new_tokens=N, **columns)

with one entry per completion: the prompt as the data row has it (a string or a message list),
the completion (a string, or for a message-list prompt `[{"role": "assistant", "content": text}]`),
its token ids, and every other column of the prompt's row by name (e.g. `answer`). It returns
one float per completion, or None where it does not apply; the weighted rewards are summed per
completion with the None entries left out (TRL's nansum). Write plugins with **kwargs so new
arguments do not break them.

A plugin that raises, returns the wrong number of values or a non-number stops the step with a
one-line RewardError naming the plugin (and, when it raised, the first sample it raises on).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable

import torch

from megaswift.errors import ConfigError, MegaswiftError


class RewardError(MegaswiftError):
    """A reward function failed or returned something other than one number per completion."""


@dataclass
class RewardFunction:
    name: str
    """The spec as configured (`module:function`), or the function's name for short."""
    fn: Callable
    weight: float = 1.0

    @property
    def short(self) -> str:
        return self.name.rsplit(":", 1)[-1]


def load_reward_funcs(specs: list[str], weights: list[float] | None = None) -> list[RewardFunction]:
    if not specs:
        raise ConfigError("grpo.reward_funcs is empty: name at least one reward function, e.g. "
                          "megaswift.rewards:accuracy or path/to/my_rewards.py:my_reward")
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"grpo.reward_weights has {len(weights)} values for {len(specs)} reward_funcs")
    shorts = [s.rsplit(":", 1)[-1] for s in specs]
    if len(set(shorts)) != len(shorts):
        raise ConfigError(f"grpo.reward_funcs: two functions share a name ({shorts}); their metrics would clash")
    weights = weights or [1.0] * len(specs)
    return [RewardFunction(s, _resolve(s), float(w)) for s, w in zip(specs, weights)]


def _resolve(spec: str) -> Callable:
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(f"reward function {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ConfigError(f"reward function {spec!r}: file {where} does not exist")
            name = "megaswift_reward_" + os.path.splitext(os.path.basename(where))[0]
            loader_spec = importlib.util.spec_from_file_location(name, where)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the plugin's
        raise ConfigError(f"reward function {spec!r}: cannot import {where}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {where} has no function {attr!r}")
    return fn


def score(funcs: list[RewardFunction], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list], max_new_tokens: int) -> torch.Tensor:
    """[completions, functions] float64 rewards, NaN where a function returned None."""
    n = len(completions)
    out = torch.full((n, len(funcs)), math.nan, dtype=torch.float64)
    for j, f in enumerate(funcs):
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                      max_new_tokens=max_new_tokens, **columns)
        try:
            values = f.fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of a plugin stops the step cleanly
            raise RewardError(_raised(f, e, prompts, completions, completion_ids, columns, max_new_tokens)) from e
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        try:
            count = len(values)
        except TypeError:
            raise RewardError(f"reward function {f.name} returned {type(values).__name__}, not a list of "
                              f"{n} floats") from None
        if count != n:
            raise RewardError(f"reward function {f.name} returned {count} values for {n} completions")
        for i, v in enumerate(values):
            if v is None:  # "does not apply to this completion"; NaN stands for it from here on
                continue
            # a real number only: float("1.0") would turn a string into a reward, and a NaN or
            # inf would read as "does not apply" or poison the advantages and the weights
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise RewardError(f"reward function {f.name} returned {v!r:.40} for completion {i} "
                                  f"({_short(completions[i])} for prompt {_short(prompts[i])}): a reward must be a "
                                  f"finite number, or None where the function does not apply")
            out[i, j] = float(v)
    return out


def combine(values: torch.Tensor, funcs: list[RewardFunction]) -> torch.Tensor:
    """The weighted sum per completion, None (NaN) entries left out."""
    w = torch.tensor([f.weight for f in funcs], dtype=values.dtype)
    return torch.nansum(values * w, dim=1)


def _raised(f: RewardFunction, e: Exception, prompts, completions, ids, columns, max_new_tokens) -> str:
    """The message for a function that raised, naming the first sample it raises on alone."""
    where = ""
    for i in range(len(completions)):
        one = {k: v[i: i + 1] for k, v in columns.items()}
        try:
            f.fn(prompts=prompts[i: i + 1], completions=completions[i: i + 1], completion_ids=ids[i: i + 1],
                 max_new_tokens=max_new_tokens, **one)
        except Exception:  # noqa: BLE001
            where = f" on completion {i} ({_short(completions[i])} for prompt {_short(prompts[i])})"
            break
    detail = str(e).splitlines()[0] if str(e) else ""
    return f"reward function {f.name} raised {type(e).__name__}{': ' + detail if detail else ''}{where}"


def _short(x, n: int = 60) -> str:
    if isinstance(x, list) and x and isinstance(x[-1], dict):
        x = x[-1].get("content", "")
    text = repr(x)
    return text if len(text) <= n else text[: n - 3] + "..."
