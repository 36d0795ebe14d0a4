"""The plugin contract as docs/algorithms.md shows it: its weighted-SFT example, taken from the
page itself, registered with one registry line, configured through its own section and trained
by the engine with the loss the page states."""
import re
from pathlib import Path

import pytest
import torch

from megaswift.errors import ConfigError
from megaswift.train import registry
from tests.helpers.train import train_config, write_chat_data

DOC = Path(__file__).resolve().parents[2] / "docs" / "algorithms.md"


@pytest.fixture
def wsft(tmp_path, monkeypatch):
    """The page's first python block as a module, and the page's registry line for it."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "wsft_doc_example.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.ALGORITHMS, "wsft", "wsft_doc_example:WeightedSFT")
    return registry.algorithm_class("wsft")


def test_docs_example_plugs_in_and_trains(wsft, tiny_hf, tmp_path):
    from megaswift.train.build import build_trainer

    data = write_chat_data(str(tmp_path / "chat.jsonl"), n=16)
    cfg = train_config(tiny_hf["qwen3"], data, str(tmp_path / "out"), wsft__weight=0.5, train__steps=2)
    assert cfg.wsft.weight == 0.5  # its section, read and checked like any other
    trainer = build_trainer(cfg, wsft())
    batch = trainer.data.next_global_batch()
    with torch.no_grad():  # the page's formula on the weights before the step
        rows = [trainer.model(**trainer.alg.forward_inputs(mb)) for mb in batch]
        means = torch.cat([(out.sum(-1) / (mb["labels"] != -100).sum(-1)) for out, mb in zip(rows, batch)])
    m = trainer.train_step(batch)
    assert m["loss"] == pytest.approx(0.5 * means.mean().item(), rel=1e-6)
    assert m["loss_tokens"] == len(means)  # units: rows, not tokens
    assert trainer.train_step(trainer.data.next_global_batch())["loss"] > 0


def test_docs_example_checks_its_plan(wsft, tiny_hf, tmp_path):
    from megaswift.train.plan import plan_training

    data = write_chat_data(str(tmp_path / "chat.jsonl"), n=4)
    cfg = train_config(tiny_hf["qwen3"], data, str(tmp_path / "out"), data__packing=True)
    plan_training(cfg, 1, algorithm="sft")  # packing is fine for plain SFT
    with pytest.raises(ConfigError, match="wsft averages each row's tokens"):
        plan_training(cfg, 1, algorithm="wsft")
    with pytest.raises(ConfigError, match="wsft.weight must be >= 0.0"):
        train_config(tiny_hf["qwen3"], data, str(tmp_path / "out"), wsft__weight=-1)


def test_unknown_algorithm_is_one_line():
    with pytest.raises(ConfigError, match="unknown algorithm 'ppo'; megaswift trains sft, dpo, grpo"):
        registry.algorithm_class("ppo")
