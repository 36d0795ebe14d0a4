"""Context parallelism equals the single-process run: 5 SFT steps, same losses and gradient norms
(fp32, relative 1e-5, as in test_train_parity.py). Rows of 64 tokens are cut into 2 cp chunks per
rank; packed rows get padding after each document, which must leave the loss unchanged."""
import numpy as np
import pytest

from tests.helpers.train import run_steps, write_chat_data
from megaswift.testing.dist import run_distributed

RTOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("cp") / "train.jsonl"))


def _assert_same(got, want):
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)
    assert [m["loss_tokens"] for m in got] == [m["loss_tokens"] for m in want]
    assert [m["tokens"] for m in got] == [m["tokens"] for m in want]


# name -> (family, world, overrides, hf fixture); mistral: one KV head (replicated by Ulysses) and
# a sliding window of 16 tokens, shorter than the rows
LAYOUTS = {
    "cp2_ring": ("llama", 2, {"parallel__cp": 2}, "tiny_hf"),
    "cp2_ring_packed": ("qwen2", 2, {"parallel__cp": 2, "data__packing": True}, "tiny_hf"),
    "cp2_ulysses_window": ("mistral", 2, {"parallel__cp": 2, "parallel__cp_comm": "ulysses"}, "tiny_hf"),
    "cp4_hybrid_u2": ("llama", 4, {"parallel__cp": 4, "parallel__cp_comm": "hybrid", "parallel__ulysses": 2},
                      "tiny_hf"),
    "cp2_tp2_sp": ("qwen3", 4, {"parallel__cp": 2, "parallel__tp": 2, "parallel__sp": True}, "tiny_hf"),
    "cp2_pp2": ("llama", 4, {"parallel__cp": 2, "parallel__pp": 2}, "deep_hf"),
    "cp2_dp2_zero1": ("qwen3", 4, {"parallel__cp": 2, "optim__zero": 1, "parallel__ddp_bucket_size": 30000},
                      "tiny_hf"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_training_matches_single_process(name, data, tmp_path, request):
    family, world, overrides, fixture = LAYOUTS[name]
    hf = request.getfixturevalue(fixture)[family]
    single = {k: v for k, v in overrides.items() if k == "data__packing"}
    want = run_steps(0, 1, hf, data, str(tmp_path / "ref"), **single)
    results = run_distributed(run_steps, world, hf, data, str(tmp_path / "cp"), **overrides)
    for got in results:
        _assert_same(got, want)


def test_checkpoint_does_not_depend_on_cp(tiny_hf, data, tmp_path):
    """Saved at cp=2 after 3 steps, resumed in one process: steps 4-6 equal the straight cp=2 run."""
    from tests.helpers.train import run_train

    hf = tiny_hf["llama"]
    straight = run_distributed(run_train, 2, hf, data, str(tmp_path / "a"), train__steps=6, checkpoint__every=3,
                               parallel__cp=2)[0]
    resumed = run_train(0, 1, hf, data, str(tmp_path / "b"), train__steps=6,
                        checkpoint__load=str(tmp_path / "a" / "checkpoints" / "step_3"))
    want = [(m["loss"], m["grad_norm"]) for m in straight if m["step"] > 3]
    np.testing.assert_allclose([(m["loss"], m["grad_norm"]) for m in resumed], want, rtol=RTOL)


def test_cp_layout_errors_name_the_numbers():
    from megaswift.errors import LayoutError
    from megaswift.models.config import ModelConfig
    from megaswift.parallel.layout import Layout

    with pytest.raises(LayoutError, match=r"ulysses \(3\) must divide cp \(4\)"):
        Layout(world_size=4, cp=4, ulysses=3)
    with pytest.raises(LayoutError, match=r"sequence length 60 is not divisible by 2 x cp \(4\) = 8"):
        Layout(world_size=4, cp=4).check_seq_len(60)
    cfg = ModelConfig(family="llama", hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=6,
                      num_query_groups=2, kv_channels=8, vocab_size=100)
    with pytest.raises(LayoutError, match=r"Ulysses degree 4 does not divide the 6 attention heads per tp rank"):
        Layout(world_size=4, cp=4, ulysses=4).check_model(cfg)
