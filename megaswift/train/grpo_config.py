"""GRPO's config section (`grpo.*`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megaswift.errors import ConfigError
from megaswift.section import Section, at_least


@dataclass(kw_only=True)
class GRPOSection(Section):
    _section: ClassVar[str] = "grpo"

    num_generations: int = at_least(2, 8)
    """Completions sampled per prompt (the group G); train.global_batch_size counts completions."""
    max_new_tokens: int = at_least(1, 64)
    """Completion length limit in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0); log-probabilities for the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probability reaches top_p."""
    top_k: int = at_least(0, 0)
    """Keep only the top_k most likely tokens; 0 = off."""
    stop_strings: list[str] = field(default_factory=list)
    """A completion also ends once it contains one of these (the EOS token always ends it)."""
    generation_batch_size: int | None = at_least(1, None)
    """Completions generated together on a rank; None = all of the rank's completions of a step."""
    reward_funcs: list[str] = field(default_factory=list)
    """Reward functions, `module:function` or `path/to/file.py:function` (see rollout/rewards.py),
    e.g. megaswift.rewards:accuracy."""
    reward_weights: list[float] | None = None
    """One weight per reward function (default 1 each); the reward is the weighted sum."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std, the whole batch's, or not at all (Dr. GRPO)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """How per-token losses are averaged (train/grpo_loss.py); dapo is TRL's default."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (GRPO) or per sequence (GSPO)."""
    epsilon: float = at_least(0.0, 0.2)
    """Lower clip range of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = at_least(0.0, None)
    """Upper clip range, 1 + epsilon_high (DAPO's clip-higher); None = epsilon."""
    beta: float = at_least(0.0, 0.0)
    """Weight of the k3 KL penalty to the reference model; 0 = no reference model at all."""
    num_iterations: int = at_least(1, 1)
    """Policy updates (optimizer steps) per rollout batch (PPO epochs, mu in the GRPO paper)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (zero advantage) and
    sample more prompts to fill the batch, up to dynamic_sampling_max_rounds rollouts a step."""
    dynamic_sampling_max_rounds: int = at_least(1, 3)
    """Rollout rounds a step may take to fill its batch; short batches are topped up with
    zero-variance groups."""
    reference: Literal["auto", "copy", "adapters"] = "auto"
    """Reference for the KL term (beta > 0): a frozen copy of the starting model, or the policy
    with its LoRA adapters off (auto: adapters under LoRA, else a copy)."""
    ref_path: str | None = None
    """Reference weights; default the weights the run starts from."""
    sync_check: bool = True
    """After each rollout, compare the rollout engine's log-probabilities with the trainer's on
    one micro batch and stop on a mismatch (stale or corrupted rollout weights)."""
    sync_check_tol: float | None = None
    """Largest allowed mean |log-prob difference| per token; None = 1e-3 in float32, 5e-2 in
    bf16/fp16 (measured differences: see README)."""

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature must be > 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"grpo.top_p must be in (0, 1]; got {self.top_p}")
