"""Reward plugins for the GRPO tests, named BY FILE PATH in grpo.reward_funcs (train.GRPO_REWARDS);
not imported by the tests. Tests assert on messages naming "grpo_rewards.py:<function>": keep the
file name."""


def multiples_of_three(completion_ids, **kwargs):
    """The share of a completion's tokens whose id divides by 3: random models give groups whose
    rewards vary, so every completion gets an advantage."""
    return [sum(t % 3 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def prompt_parity(prompts, completion_ids, answer, **kwargs):
    """Equal rewards within every group of an even `answer` (no advantage there), varying ones
    for odd answers: what dynamic sampling filters."""
    return [0.5 if int(a) % 2 == 0 else len(ids) % 2 + sum(ids) % 5 for a, ids in zip(answer, completion_ids)]


def raises_on_long(completions, **kwargs):
    return [1.0 / (5 - min(len(c), 5)) for c in completions]


def fails_on_rank_one(completions, **kwargs):
    """Raises on global rank 1 only: the other ranks must stop with its message, not hang."""
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("judge unreachable")
    return [0.0] * len(completions)
