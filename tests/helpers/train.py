"""Shared by the training tests: small generated data sets (chat, preference, prompt), configs,
and Trainer runs on one rank (SFT, DPO, GRPO)."""
import json
import os
import random

from megaswift.config import load_config

WORDS = ["kalo", "mine", "ruza", "tovi", "zequ", "anel", "sato", "vimi", "loka", "neru"]


def _words(path: str, seed: int):
    """A seeded generator and a k-word text maker; creates path's directory."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return rng, lambda k: " ".join(rng.choice(WORDS) for _ in range(k))


def write_chat_data(path: str, n: int = 48, seed: int = 0) -> str:
    """Chat rows of varied length (some multi-turn, some with a system message)."""
    rng, text = _words(path, seed)

    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": text(3)}] if i % 3 == 0 else []
            for _ in range(1 + i % 2):
                msgs += [{"role": "user", "content": text(rng.randint(2, 8))},
                         {"role": "assistant", "content": text(rng.randint(1, 10))}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def train_config(hf_dir: str, data: str, output_dir: str, **overrides):
    base = {"model": {"hf_path": hf_dir, "attention_backend": "sdpa"},
            "data": {"path": data, "seq_len": 64},
            "train": {"steps": 5, "micro_batch_size": 2, "global_batch_size": 8, "seed": 3, "output_dir": output_dir},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr": 3e-4, "weight_decay": 0.1, "clip_grad": 1.0},
            "log": {"every": 1000}}
    args = []
    for key, value in overrides.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return load_config(None, args, base=base)


def run_steps(rank, world, hf_dir, data, output_dir, steps=None, **overrides) -> list[dict]:
    """Build a Trainer and run `steps` optimizer steps (all of train.steps if None); per-step metrics."""
    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT

    cfg = train_config(hf_dir, data, output_dir, **overrides)
    trainer = build_trainer(cfg, SFT())
    out = []
    for _ in range(steps or cfg.train.steps):
        out.append(trainer.train_step(trainer.data.next_global_batch()))
    return out


def run_train(rank, world, hf_dir, data, output_dir, **overrides) -> list[dict]:
    """Trainer.train() as the CLI runs it (checkpoints included); rank 0's metrics.jsonl rows."""
    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT

    cfg = train_config(hf_dir, data, output_dir, **overrides)
    build_trainer(cfg, SFT()).train()
    if rank != 0:
        return []
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_preference_data(path: str, n: int = 32, seed: int = 0) -> str:
    """Preference rows in every supported format, in turn: TRL explicit prompt (message lists),
    explicit string prompt, implicit prompt (shared leading messages), messages + rejected_response."""
    rng, text = _words(path, seed)

    with open(path, "w") as f:
        for i in range(n):
            q, good, bad = text(rng.randint(2, 6)), text(rng.randint(1, 6)), text(rng.randint(1, 6))
            user = [{"role": "user", "content": q}]
            if i % 4 == 0:
                row = {"prompt": user, "chosen": [{"role": "assistant", "content": good}],
                       "rejected": [{"role": "assistant", "content": bad}]}
            elif i % 4 == 1:
                row = {"prompt": q, "chosen": " " + good, "rejected": " " + bad}
            elif i % 4 == 2:
                row = {"chosen": user + [{"role": "assistant", "content": good}],
                       "rejected": user + [{"role": "assistant", "content": bad}]}
            else:
                row = {"messages": user + [{"role": "assistant", "content": good}], "rejected_response": bad}
            f.write(json.dumps(row) + "\n")
    return path


def run_dpo_steps(rank, world, hf_dir, data, output_dir, steps=None, **overrides) -> list[dict]:
    """Build a DPO Trainer and run `steps` optimizer steps; per-step metrics."""
    from megaswift.train.build import build_trainer
    from megaswift.train.dpo import DPO

    cfg = train_config(hf_dir, data, output_dir, **overrides)
    trainer = build_trainer(cfg, DPO())
    return [trainer.train_step(trainer.data.next_global_batch()) for _ in range(steps or cfg.train.steps)]


def write_prompt_data(path: str, n: int = 16, seed: int = 0) -> str:
    """GRPO prompts: string prompts and message lists in turn, each with an `answer` column."""
    rng, text = _words(path, seed)
    with open(path, "w") as f:
        for i in range(n):
            q = text(rng.randint(2, 8))
            prompt = q if i % 2 else [{"role": "user", "content": q}]
            f.write(json.dumps({"prompt": prompt, "answer": str(i)}) + "\n")
    return path


# the reward plugins, named by file path as a user names theirs (the trainer loads the file itself)
GRPO_REWARDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo_rewards.py")


def grpo_config(hf_dir: str, data: str, output_dir: str, **overrides):
    """4 completions of 2 prompts per step (8 rows of 32 tokens, 8 new), random-token rewards."""
    base = {"data__seq_len": 32, "train__micro_batch_size": 2, "train__global_batch_size": 8,
            "grpo__num_generations": 4, "grpo__max_new_tokens": 8,
            "grpo__reward_funcs": f"[{GRPO_REWARDS}:multiples_of_three]"}
    return train_config(hf_dir, data, output_dir, **{**base, **overrides})


def run_grpo_steps(rank, world, hf_dir, data, output_dir, steps=3, **overrides) -> list[dict]:
    """Build a GRPO Trainer and run `steps` optimizer steps; per-step metrics (the engine's and the
    rollout's)."""
    from megaswift.train.build import build_trainer
    from megaswift.train.grpo import GRPO

    trainer = build_trainer(grpo_config(hf_dir, data, output_dir, **overrides), GRPO())
    out = []
    for _ in range(steps):
        m = trainer.train_step(trainer.data.next_global_batch())
        m.update(trainer.alg.step_metrics(data_s=0.0, step_s=1.0))
        out.append(m)
    return out
