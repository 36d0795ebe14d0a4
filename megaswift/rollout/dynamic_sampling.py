"""DAPO's dynamic sampling (Yu et al. 2025, https://arxiv.org/abs/2503.14476): groups whose
rewards are all equal have zero advantage and teach nothing, so more prompts are sampled until
each dp rank has enough groups whose rewards vary.

A round is (this rank's completions, the global score table, [groups] rewards vary); groups
are numbered dp rank by dp rank, n_local per rank. Pure functions of the rounds, so every rank
picks the same groups for every dp rank.
"""
from __future__ import annotations

import torch

from .rewards import combine


def group_varies(table: torch.Tensor, funcs, group_size: int) -> torch.Tensor:
    """[groups] True where a group's rewards are not all equal."""
    reward = combine(table[:, : len(funcs)], funcs).view(-1, group_size)
    return (reward.max(1).values - reward.min(1).values) > 1e-9


def kept(rounds, n_local: int, d: int) -> list[tuple[int, int]]:
    """(round, group) of dp rank d's groups with varying rewards, in the order sampled."""
    out = []
    for r, (_, _, varies) in enumerate(rounds):
        out += [(r, j) for j in range(n_local) if varies[d * n_local + j]]
    return out


def enough(rounds, n_local: int, dp: int) -> bool:
    """Every dp rank has n_local groups with varying rewards."""
    return all(len(kept(rounds, n_local, d)) >= n_local for d in range(dp))


def pick(rounds, n_local: int, d: int, dynamic: bool) -> list[tuple[int, int]]:
    """The groups dp rank d trains on: all of the first round's, or under dynamic sampling the
    first n_local with varying rewards, topped up with equal-reward ones if too few."""
    if not dynamic:
        return [(0, j) for j in range(n_local)]
    good = kept(rounds, n_local, d)
    rest = [(r, j) for r in range(len(rounds)) for j in range(n_local) if (r, j) not in good]
    return (good + rest)[:n_local]
