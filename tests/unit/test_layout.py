"""Layout rules that need no process group: each error names the numbers that do not divide."""
import pytest

from megaswift.errors import LayoutError
from megaswift.models.config import ModelConfig
from megaswift.parallel.layout import Layout


def cfg(**kw):
    base = dict(family="llama", vocab_size=1001, hidden_size=64, ffn_hidden_size=88, num_layers=2,
                num_attention_heads=12, num_query_groups=4, kv_channels=16)
    return ModelConfig(**{**base, **kw})


def test_valid_layouts_pass():
    Layout(world_size=8, tp=4).check_model(cfg())  # kv 4 split over 4
    Layout(world_size=8, tp=2).check_model(cfg())
    Layout(world_size=4, tp=4).check_model(cfg(num_attention_heads=8, num_query_groups=2))  # kv replicated


@pytest.mark.parametrize("kw,tp,msg", [
    (dict(), 3, r"num_key_value_heads \(4\) and tp \(3\)"),
    (dict(num_attention_heads=10, num_query_groups=2), 4, r"num_attention_heads \(10\) is not divisible by tp \(4\)"),
    (dict(ffn_hidden_size=90), 4, r"intermediate_size \(90\) is not divisible by tp \(4\)"),
    (dict(num_attention_heads=12, num_query_groups=8), 1, r"num_attention_heads \(12\) is not divisible by num_key_value_heads \(8\)"),
    (dict(num_moe_experts=4, moe_ffn_hidden_size=8, moe_shared_expert_ffn_hidden_size=30), 4,
     r"shared expert's width \(30.*not divisible by tp \(4\)"),
])
def test_model_rules_name_the_numbers(kw, tp, msg):
    with pytest.raises(LayoutError, match=msg):
        Layout(world_size=tp * 2, tp=tp).check_model(cfg(**kw))


def test_degree_products_and_sequence_rules():
    assert Layout(world_size=16, tp=2, pp=2, cp=2).dp == 2
    assert Layout(world_size=8, tp=2, ep=4).edp == 2  # (tp*cp*dp) / (ep*etp) = 8 / 4
    with pytest.raises(LayoutError, match=r"tp\(2\) \* pp\(2\) \* cp\(2\) = 8"):
        Layout(world_size=12, tp=2, pp=2, cp=2)
    with pytest.raises(LayoutError, match="positive integer"):
        Layout(world_size=4, tp=0)
    with pytest.raises(LayoutError, match=r"sequence length 30 is not divisible by tp \(4\)"):
        Layout(world_size=4, tp=4, sp=True).check_seq_len(30)
    Layout(world_size=4, tp=4, sp=False).check_seq_len(30)
    with pytest.raises(LayoutError, match=r"num_layers \(2\) is smaller than pp \(4\)"):
        Layout(world_size=4, pp=4).check_model(cfg())


def test_vocab_padding_is_a_multiple_of_divisor_times_tp():
    c = cfg()
    assert c.padded_vocab_size(1) == 1024 and c.padded_vocab_size(4) == 1024 and c.padded_vocab_size(16) == 2048
