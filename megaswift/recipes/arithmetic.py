"""The quickstart's task: a tiny Qwen3 model learns to add two numbers by SFT on chat rows.

Everything is made here, with no download: the data set (questions with exact answers), a small
tokenizer that keeps every digit a token of its own, a random-weight checkpoint, and a greedy
evaluation of an exported checkpoint on held-out questions. Sizes and the training recipe were
tuned on one CPU core; see benchmarks/quickstart_tuning.md.
"""
from __future__ import annotations

import json
import os
import random
from typing import Callable

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS, PAD = "<|im_end|>", "<|endoftext|>"

# Measured on one CPU core (benchmarks/quickstart_tuning.md): with 1500 steps of 16 rows this learns
# addition in about 70 s. Depth matters more than width (2 or 3 layers stall on the units digit);
# head counts are even so that TP=2 splits them.
MODEL_SIZE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=16)
# Operands 10..99 (every question the same width) were tried too and learnt no faster.
OPERANDS = (0, 99)


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def write_arithmetic_data(out_dir: str, n_train: int, n_test: int, seed: int = 0,
                          operands: tuple[int, int] = OPERANDS) -> tuple[str, str]:
    """Write train.jsonl and test.jsonl of addition questions; no test question appears in train."""
    def row(a, b, rng):
        return {"messages": [{"role": "user", "content": question(a, b)},
                             {"role": "assistant", "content": str(a + b)}]}
    return _write_splits(out_dir, ("train.jsonl", "test.jsonl"), n_train, n_test, seed, operands, row)


def _write_splits(out_dir: str, names: tuple[str, str], n_train: int, n_test: int, seed: int,
                  operands: tuple[int, int], make_row) -> tuple[str, str]:
    """Draw (a, b) pairs without replacement from all lo <= a, b <= hi and write make_row(a, b,
    rng) for each to a train and a test file: the split is disjoint by construction, so the test
    set measures generalisation, not recall."""
    lo, hi = operands
    width = hi - lo + 1
    if n_train + n_test > width ** 2:
        raise ValueError(f"n_train ({n_train}) + n_test ({n_test}) > {width ** 2} distinct questions with "
                         f"operands in [{lo}, {hi}]; ask for fewer rows or widen operands")
    rng = random.Random(seed)
    picks = rng.sample(range(width ** 2), n_train + n_test)
    os.makedirs(out_dir, exist_ok=True)
    paths = tuple(os.path.join(out_dir, n) for n in names)
    for path, chunk in zip(paths, (picks[:n_train], picks[n_train:])):
        with open(path, "w") as f:
            for p in chunk:
                a, b = (lo + x for x in divmod(p, width))
                f.write(json.dumps(make_row(a, b, rng)) + "\n")
    return paths


def _tokenizer_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    text = [question(rng.randint(0, 999), rng.randint(0, 999)) for _ in range(500)]
    return text + ["user", "assistant", "system", "You are a helpful assistant."] * 20


def write_tokenizer(out_dir: str, vocab_size: int = 320, seed: int = 0):
    """Train a byte-level BPE whose digits are always single tokens; save it as a fast tokenizer.

    Splitting digits before BPE means no merge can fuse them, so "37" is "3","7" and the model
    sees place value, which is what makes addition learnable by a model this small.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def write_model(out_dir: str, vocab_size: int, seed: int = 0, *, eos_token_id: int | None = None,
                pad_token_id: int | None = None, **size) -> str:
    """Write a random-weight fp32 Qwen3 checkpoint; `size` overrides MODEL_SIZE keys."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    dims = {**MODEL_SIZE, **size}
    config = Qwen3Config(vocab_size=vocab_size, max_position_embeddings=128, rope_theta=10000.0,
                         tie_word_embeddings=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         **dims)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def score(expected: list[str], answers: list[str]) -> int:
    """Exact match after stripping: "82" is right, "82 " is right, "820" and "8 2" are wrong."""
    return sum(e.strip() == a.strip() for e, a in zip(expected, answers))


def hf_generate(hf_dir: str, batch_size: int = 64) -> Callable[[list[list[dict]], int], list[str]]:
    """A greedy generate function over chat prompts, backed by transformers, for `evaluate`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.padding_side = "left"  # left padding keeps every prompt's last token at the batch's end
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def generate(prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id)]
                out.append(tok.decode(row, skip_special_tokens=True).strip())
        return out

    return generate


def evaluate(hf_dir: str | None, test_path: str, n: int | None = None, max_new_tokens: int = 6,
             generate: Callable[[list[list[dict]], int], list[str]] | None = None) -> dict:
    """Greedy accuracy of the checkpoint at hf_dir on the first n rows of test_path.

    `generate(prompts, max_new_tokens) -> answers` replaces the transformers model (tests pass a
    stub); prompts are the rows' messages without the final assistant turn.
    """
    rows = read_rows(test_path)[:n]
    prompts = [r["messages"][:-1] for r in rows]
    expected = [r["messages"][-1]["content"] for r in rows]
    answers = (generate or hf_generate(hf_dir))(prompts, max_new_tokens)
    correct = score(expected, answers)
    return dict(accuracy=correct / max(len(rows), 1), correct=correct, total=len(rows),
                examples=[(p[-1]["content"], e, a) for p, e, a in zip(prompts, expected, answers)])


def write_preference_data(out_dir: str, n_train: int, n_test: int, seed: int = 0,
                          operands: tuple[int, int] = OPERANDS) -> tuple[str, str]:
    """Preference pairs for DPO on the same questions: the correct sum is chosen, a sum off by
    1 to 10 rejected (TRL's explicit-prompt format, message lists); train and test disjoint."""
    def row(a, b, rng):
        wrong = a + b + rng.choice([d for d in range(-10, 11) if d and a + b + d >= 0])
        return {"prompt": [{"role": "user", "content": question(a, b)}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": str(wrong)}]}
    return _write_splits(out_dir, ("pref_train.jsonl", "pref_test.jsonl"), n_train, n_test, seed, operands, row)


def write_prompt_data(out_dir: str, n_train: int, n_test: int, seed: int = 0,
                      operands: tuple[int, int] = OPERANDS) -> tuple[str, str]:
    """GRPO prompts: the question as a chat prompt and the sum in an `answer` column, which
    reaches the reward functions (megaswift.rewards:accuracy) by name."""
    def row(a, b, rng):
        return {"prompt": [{"role": "user", "content": question(a, b)}], "answer": str(a + b)}
    return _write_splits(out_dir, ("prompts_train.jsonl", "prompts_test.jsonl"), n_train, n_test, seed, operands, row)


def preference_accuracy(hf_dir: str, path: str, seq_len: int = 32) -> float:
    """Share of the pairs in `path` whose chosen response the model at hf_dir finds more likely
    than the rejected one (summed log-probabilities of the response tokens), with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaswift.data.preference import PreferenceDataset

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pairs = PreferenceDataset(path, tok, seq_len)
    wins = 0
    with torch.no_grad():
        for chosen, rejected in pairs.pairs:
            logps = []
            for ids, labels in (chosen, rejected):
                logits = model(torch.tensor([ids])).logits[0]
                lab = torch.tensor(labels)
                keep = lab != -100
                logps.append(torch.log_softmax(logits[keep], -1).gather(1, lab[keep, None]).sum().item())
            wins += logps[0] > logps[1]
    return wins / len(pairs)
