"""The built-in rollout engine (rollout/sampler.py) on one process: greedy decoding with the KV
cache equals transformers' generate on left-padded prompts of different lengths (tokens exactly,
log-probabilities to 1e-5), sampled log-probabilities equal the trainer's full forward, and
sampling is reproducible per row seed whatever the batch holds."""
import pytest
import torch

from megaswift.setup import hf_model_config
from megaswift.config import load_config
from megaswift.convert.hf_import import load_hf_into_model
from megaswift.models.decoder import GPTModel
from megaswift.rollout.sampler import SamplingParams, _filter, generate

PROMPT_LENS = (3, 9, 6)


def _model(hf_dir):
    mc = hf_model_config(hf_dir, load_config())
    model = GPTModel(mc)
    load_hf_into_model(model, hf_dir)
    return model.eval()


def _prompts(vocab, lens=PROMPT_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens]


# mistral: a sliding window of 8; deepseek_v3: multi-latent attention (q/k heads wider than v) and
# the group-limited router with an expert bias; glm4_moe: partial RoPE
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "deepseek_v3", "glm4_moe"])
def test_greedy_equals_transformers_generate(tiny_hf, latent_hf, family):
    from transformers import AutoModelForCausalLM

    hf_dir = (latent_hf if family in latent_hf else tiny_hf)[family]
    model = _model(hf_dir)
    prompts = _prompts(model.cfg.vocab_size)
    n_new = 8
    ours = generate(model, prompts, SamplingParams(max_new_tokens=n_new, temperature=0), seeds=[0, 1, 2])
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    width = max(PROMPT_LENS)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    want = out.sequences[:, width:]
    assert ours.completion_ids == want.tolist()
    hf_logps = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], 1)  # [b, n, V]
    hf_logps = hf_logps.gather(2, want[..., None])[..., 0]
    torch.testing.assert_close(torch.tensor(ours.logps), hf_logps, rtol=0, atol=1e-5)
    assert ours.truncated == [True] * 3


def test_sampled_logps_equal_the_trainers_forward(tiny_hf):
    """The rollout log-probabilities (KV cache, temperature 0.7, top-k/top-p) equal those of one
    full forward of prompt + completion at the same temperature: what GRPO's importance ratio and
    its weight-sync check rely on."""
    model = _model(tiny_hf["qwen3"])
    prompts = _prompts(model.cfg.vocab_size)
    params = SamplingParams(max_new_tokens=7, temperature=0.7, top_k=50, top_p=0.9)
    gen = generate(model, prompts, params, seeds=[11, 12, 13])
    model.logits_temperature = 0.7
    for p, c, lp in zip(prompts, gen.completion_ids, gen.logps):
        seq = torch.tensor([p + c])
        labels = torch.full_like(seq, -100)
        labels[0, len(p) - 1: -1] = torch.tensor(c)
        with torch.no_grad():
            nll = model(seq, labels=labels)[0, len(p) - 1: -1]
        torch.testing.assert_close(-nll, torch.tensor(lp, dtype=torch.float32), rtol=0, atol=1e-5)


def test_a_rows_sample_depends_only_on_its_seed(tiny_hf):
    model = _model(tiny_hf["llama"])
    prompts = _prompts(model.cfg.vocab_size)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    both = generate(model, prompts, params, seeds=[5, 6, 7])
    again = generate(model, prompts, params, seeds=[5, 6, 7])
    alone = generate(model, prompts[1:2], params, seeds=[6])
    other = generate(model, prompts, params, seeds=[8, 9, 10])
    assert both.completion_ids == again.completion_ids
    assert alone.completion_ids[0] == both.completion_ids[1]
    torch.testing.assert_close(torch.tensor(alone.logps[0]), torch.tensor(both.logps[1]), rtol=0, atol=1e-5)
    assert other.completion_ids != both.completion_ids


def test_stop_tokens_end_rows_and_are_kept(tiny_hf):
    model = _model(tiny_hf["llama"])
    prompts = _prompts(model.cfg.vocab_size)
    free = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0), seeds=[0, 1, 2])
    stop = free.completion_ids[1][2]  # row 1 stops at its third token; the others when they meet it
    gen = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=(stop,)),
                   seeds=[0, 1, 2])
    for full, cut, trunc in zip(free.completion_ids, gen.completion_ids, gen.truncated):
        n = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:n]
        assert trunc == (stop not in full)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda k, p: torch.isfinite(_filter(logits, k, p))[0].tolist()  # noqa: E731
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(0, 0.5) == [True, False, False, False]
    assert kept(0, 0.8) == [True, True, False, False]
    assert kept(0, 0.81) == [True, True, True, False]
    assert kept(1, 0.99) == [True, False, False, False]


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_filtered_tokens():
    from megaswift.rollout.sampler import sample

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, logps = sample(logits, SamplingParams(max_new_tokens=1), u)
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)
    torch.testing.assert_close(logps, probs.log()[tokens])
    tokens, _ = sample(logits, SamplingParams(max_new_tokens=1, top_k=2), u)
    assert set(tokens.tolist()) == {0, 1}
    ends = torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64)
    assert sample(logits[:2], SamplingParams(max_new_tokens=1), ends)[0].tolist() == [0, 3]
    assert sample(logits[:2], SamplingParams(max_new_tokens=1, top_k=2), ends)[0].tolist() == [0, 1]
