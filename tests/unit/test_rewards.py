"""Reward plugins (rollout/rewards.py) and the built-in rewards (megaswift/rewards.py)."""
import math

import pytest
import torch

from megaswift import rewards
from megaswift.errors import ConfigError
from megaswift.rollout.rewards import RewardError, combine, load_reward_funcs, score


def _score(funcs, completions, **columns):
    n = len(completions)
    return score(funcs, ["q"] * n, completions, [[1, 2]] * n, columns, max_new_tokens=8)


def test_accuracy_reads_boxed_then_last_number():
    completions = ["The sum is \\boxed{42}.", "so 40 + 2 = 42", "42.0", "1,000", "4 2", "no idea", "\\boxed{\\frac{1}{2}}"]
    answers = ["42", "42", "42", "1000", "42", "42", "\\frac{1}{2}"]
    assert rewards.accuracy(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert rewards.accuracy(["42"], answer=[None]) == [None]
    assert rewards.accuracy(["42"]) == [None]
    chat = [[{"role": "assistant", "content": "It is 7"}]]
    assert rewards.accuracy(chat, answer=["7"]) == [1.0]


def test_format_and_length_rewards():
    assert rewards.answer_format(["x = \\boxed{3}", "it is 12.", "twelve", "12 apples"]) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.think_format(["<think>a</think> 3", "<think>a</think>", "3 <think>a</think> 3"]) == [1.0, 0.0, 0.0]
    ids = [[0] * n for n in (4, 6, 7, 8)]  # budget 2 of 8: free up to 6 tokens
    assert rewards.length_penalty(["", "", "", ""], ids, max_new_tokens=8) == [0.0, 0.0, -0.5, -1.0]


def test_plugins_load_from_modules_and_files(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def short(completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    funcs = load_reward_funcs(["megaswift.rewards:answer_format", f"{f}:short"], [2.0, 0.5])
    values = _score(funcs, ["12", "abc"])
    torch.testing.assert_close(values, torch.tensor([[1.0, 1 / 3], [0.0, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(combine(values, funcs), torch.tensor([2 + 1 / 6, 0.125], dtype=torch.float64))


def test_none_is_left_out_of_the_weighted_sum():
    funcs = load_reward_funcs(["megaswift.rewards:accuracy", "megaswift.rewards:answer_format"])
    values = _score(funcs, ["3", "x"], answer=["3", None])
    assert math.isnan(values[1, 0])
    torch.testing.assert_close(combine(values, funcs), torch.tensor([2.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "expected module:function"),
    ("megaswift.rewards:nope", "has no function 'nope'"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("missing/file.py:f", "does not exist"),
])
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_funcs([spec])


def test_config_errors_for_weights_and_empty_list():
    with pytest.raises(ConfigError, match="2 values for 1 reward_funcs"):
        load_reward_funcs(["megaswift.rewards:accuracy"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="is empty"):
        load_reward_funcs([])


def _plugin(tmp_path, body: str):
    f = tmp_path / "bad_rewards.py"
    f.write_text(body)
    return load_reward_funcs([f"{f}:r"])


def test_a_raising_plugin_names_itself_and_the_sample(tmp_path):
    funcs = _plugin(tmp_path, "def r(completions, **kw):\n"
                              "    return [1.0 / (len(c) - 3) for c in completions]\n")
    with pytest.raises(RewardError) as e:
        _score(funcs, ["12345", "abc", "xy"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "bad_rewards.py:r raised ZeroDivisionError" in msg and "completion 1 ('abc'" in msg


def test_wrong_count_and_non_numbers_name_the_plugin(tmp_path):
    funcs = _plugin(tmp_path, "def r(completions, **kw):\n    return [1.0]\n")
    with pytest.raises(RewardError, match=r"bad_rewards.py:r returned 1 values for 3 completions"):
        _score(funcs, ["a", "b", "c"])
    funcs = _plugin(tmp_path, "def r(completions, **kw):\n    return ['good'] * len(completions)\n")
    with pytest.raises(RewardError, match=r"returned 'good' for completion 0 \('a' for prompt .*\): a reward must be a "
                                          r"finite number, or None where the function does not apply"):
        _score(funcs, ["a"])
    funcs = _plugin(tmp_path, "def r(completions, **kw):\n    return 3.0\n")
    with pytest.raises(RewardError, match=r"returned float, not a list of 1 floats"):
        _score(funcs, ["a"])


def test_columns_reach_plugins_by_name(tmp_path):
    funcs = _plugin(tmp_path, "def r(prompts, completions, completion_ids, max_new_tokens, answer, level, **kw):\n"
                              "    return [float(a == c) * l + max_new_tokens for c, a, l in "
                              "zip(completions, answer, level)]\n")
    values = _score(funcs, ["1", "2"], answer=["1", "3"], level=[5, 7])
    assert values[:, 0].tolist() == [13.0, 8.0]


@pytest.mark.parametrize("bad, shown", [("float('nan')", "nan"), ("float('inf')", "inf"), ("'1.0'", "'1.0'"),
                                        ("[1.0]", r"\[1.0\]")])
def test_nan_inf_and_strings_are_errors_not_rewards(tmp_path, bad, shown):
    """NaN once read as 'does not apply' (an all-NaN function trained on nothing), inf trained on
    NaN, and a string '1.0' passed as 1.0. None stays 'does not apply'."""
    funcs = _plugin(tmp_path, f"def r(completions, **kw):\n    return [0.5, {bad}, None]\n")
    with pytest.raises(RewardError, match=rf"bad_rewards.py:r returned {shown} for completion 1 \('b' for prompt"):
        _score(funcs, ["a", "b", "c"])


def test_none_means_does_not_apply_and_numbers_of_any_kind_count(tmp_path):
    funcs = _plugin(tmp_path, "import numpy as np\n"
                              "def r(completions, **kw):\n    return [None, np.float32(0.25), True]\n")
    values = _score(funcs, ["a", "b", "c"])
    assert math.isnan(values[0, 0].item()) and values[1:, 0].tolist() == [0.25, 1.0]
