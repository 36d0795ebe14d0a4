import re

import pytest
import torch

from megaswift.recipes import arithmetic as ar

QUESTION = re.compile(r"^What is (\d+) \+ (\d+)\?$")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random-weight checkpoint with the recipe's tokenizer, small enough to generate from quickly."""
    d = str(tmp_path_factory.mktemp("arith_hf"))
    tok = ar.write_tokenizer(d)
    ar.write_model(d, len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16)
    return d


def test_data_rows_are_correct_and_test_is_held_out(tmp_path):
    train, test = ar.write_arithmetic_data(str(tmp_path), n_train=400, n_test=60, seed=3)
    rows = {p: ar.read_rows(p) for p in (train, test)}
    assert len(rows[train]) == 400 and len(rows[test]) == 60
    questions = {}
    for path, rs in rows.items():
        for r in rs:
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            a, b = map(int, QUESTION.match(r["messages"][0]["content"]).groups())
            assert 0 <= a <= 99 and 0 <= b <= 99
            assert r["messages"][1]["content"] == str(a + b)
            questions.setdefault(path, set()).add(r["messages"][0]["content"])
    assert len(questions[train]) == 400 and len(questions[test]) == 60  # no duplicates within a split
    assert not questions[train] & questions[test]
    # the same seed gives the same files; another seed gives another split
    again = ar.write_arithmetic_data(str(tmp_path / "again"), 400, 60, seed=3)
    assert open(again[1]).read() == open(test).read()
    other = ar.write_arithmetic_data(str(tmp_path / "other"), 400, 60, seed=4)
    assert open(other[1]).read() != open(test).read()


def test_data_refuses_more_rows_than_questions(tmp_path):
    with pytest.raises(ValueError, match=r"n_train \(90\) \+ n_test \(20\) > 100 distinct questions"):
        ar.write_arithmetic_data(str(tmp_path), 90, 20, operands=(0, 9))


def test_tokenizer_digits_template_and_specials(hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    for n in (0, 7, 10, 37, 99, 100, 198, 1234567890):
        pieces = tok.tokenize(f"What is {n}?")
        assert [p for p in pieces if any(c.isdigit() for c in p)] == list(str(n)), pieces
    msgs = [{"role": "user", "content": "What is 37 + 45?"}, {"role": "assistant", "content": "82"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nWhat is 37 + 45?<|im_end|>\n<|im_start|>assistant\n82<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # specials are single tokens
    assert tok.decode(ids) == prompt


def test_model_loads_with_transformers(hf_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    ids = tok("What is 1 + 2?", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    # the default sizes split evenly under TP=2
    ar.write_model(str(tmp_path), 300, seed=1)
    cfg = AutoConfig.from_pretrained(str(tmp_path))
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert getattr(cfg, key) == ar.MODEL_SIZE[key] and getattr(cfg, key) % 2 == 0
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="auto").parameters()} == {
        torch.float32}


def test_evaluate_scores_exact_answers(tmp_path):
    _, test = ar.write_arithmetic_data(str(tmp_path), 10, 6, seed=0)
    rows = ar.read_rows(test)
    truth = [r["messages"][1]["content"] for r in rows]
    seen = []

    def stub(prompts, max_new_tokens):
        seen.append((prompts, max_new_tokens))
        # right, right with spaces, one digit too many, split digits, right, wrong
        return [truth[0], f" {truth[1]} ", truth[2] + "0", " ".join(truth[3]) + " 1", truth[4], "x"]

    res = ar.evaluate(None, test, n=6, max_new_tokens=5, generate=stub)
    assert (res["correct"], res["total"]) == (3, 6) and res["accuracy"] == 0.5
    assert seen[0][1] == 5 and seen[0][0] == [r["messages"][:1] for r in rows]
    assert res["examples"][2] == (rows[2]["messages"][0]["content"], truth[2], truth[2] + "0")
    assert ar.evaluate(None, test, n=2, generate=lambda p, k: ["?"] * len(p))["total"] == 2


def test_evaluate_batched_generation_matches_one_by_one(hf_dir, tmp_path):
    """Left padding must not change greedy answers: a batch of mixed-length prompts gives what
    each prompt gives alone."""
    _, test = ar.write_arithmetic_data(str(tmp_path), 0, 8, seed=1)
    batched = ar.evaluate(hf_dir, test, max_new_tokens=4)
    single = ar.evaluate(hf_dir, test, max_new_tokens=4, generate=ar.hf_generate(hf_dir, batch_size=1))
    assert batched["total"] == 8 and 0 <= batched["correct"] <= 8
    assert [e[2] for e in batched["examples"]] == [e[2] for e in single["examples"]]
    assert all(isinstance(a, str) and "<|" not in a for _, _, a in batched["examples"])
    lengths = {len(q) for q, _, _ in batched["examples"]}
    assert len(lengths) > 1  # the batch really was padded
