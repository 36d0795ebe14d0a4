"""The parallel layout: degrees, their product with the world size, and the model rules.

Everything here is pure arithmetic, so a layout that cannot fit fails before any process group
(or any process) starts, with a message that names the numbers that do not divide.

Rank order follows Megatron: tp varies fastest, then cp, then dp, then pp:

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Experts use a second view of the same ranks inside each pipeline stage: etp fastest, then ep,
then expert-dp (edp = tp * cp * dp / (etp * ep)).
"""
from __future__ import annotations

from dataclasses import dataclass

from megaswift.errors import LayoutError


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    ulysses: int = 1  # Ulysses degree inside cp (cp_comm ulysses: cp; hybrid: parallel.ulysses; ring: 1)

    def __post_init__(self):
        for name in ("world_size", "tp", "pp", "cp", "ep", "etp", "ulysses"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"parallel.{name} must be a positive integer, got {v!r}")
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size % model_parallel:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by tp({self.tp}) * pp({self.pp}) * cp({self.cp})"
                f" = {model_parallel}; use a world size that is a multiple of {model_parallel}"
                " or change parallel.tp/pp/cp"
            )
        if self.cp % self.ulysses:
            raise LayoutError(f"parallel.ulysses ({self.ulysses}) must divide cp ({self.cp}): the cp group is "
                              f"ulysses x ring ranks")
        per_stage = self.world_size // self.pp
        if per_stage % (self.ep * self.etp):
            where = (f"world size {self.world_size}" if self.pp == 1 else
                     f"ranks per pipeline stage, world size {self.world_size} / pp({self.pp}) = {per_stage},")
            raise LayoutError(f"{where} is not divisible by ep({self.ep}) * etp({self.etp}) = {self.ep * self.etp};"
                              f" choose ep * etp among {_divisors(per_stage)}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.pp * self.ep * self.etp)

    def describe(self) -> str:
        return (f"world={self.world_size} tp={self.tp} pp={self.pp} cp={self.cp} dp={self.dp}"
                f" ep={self.ep} etp={self.etp} edp={self.edp} sp={self.sp}")

    def check_model(self, cfg) -> None:
        """Rules that depend on the model (a `megaswift.models.config.ModelConfig`)."""
        tp = self.tp
        if cfg.num_attention_heads % tp:
            raise LayoutError(
                f"num_attention_heads ({cfg.num_attention_heads}) is not divisible by tp ({tp});"
                f" choose tp among {_divisors(cfg.num_attention_heads)}"
            )
        kv = cfg.num_query_groups
        if kv % tp and tp % kv:
            raise LayoutError(
                f"num_key_value_heads ({kv}) and tp ({tp}) must divide one another"
                " (tp <= kv heads splits them, tp > kv heads replicates them)"
            )
        if cfg.num_attention_heads % kv:
            raise LayoutError(
                f"num_attention_heads ({cfg.num_attention_heads}) is not divisible by"
                f" num_key_value_heads ({kv})"
            )
        if cfg.ffn_hidden_size % tp:
            raise LayoutError(
                f"ffn_hidden_size / intermediate_size ({cfg.ffn_hidden_size}) is not divisible by tp ({tp})"
            )
        shared = cfg.moe_shared_expert_ffn_hidden_size if cfg.moe_layers else 0
        if shared % tp:  # the shared expert is a dense MLP split over tp like any other
            raise LayoutError(f"the shared expert's width ({shared}: shared_expert_intermediate_size, or "
                              f"n_shared_experts x moe_intermediate_size) is not divisible by tp ({tp})")
        linear = [i for i in range(cfg.num_layers) if cfg.token_mixer_for_layer(i) == "gated_deltanet"]
        if linear and self.cp > 1:
            raise LayoutError("context parallelism is not supported for Gated DeltaNet layers (Qwen3-Next, Qwen3.5): "
                              "they need each sequence's tokens in order on one rank; use tp or pp instead of cp")
        if linear and cfg.linear_num_key_heads % tp:
            raise LayoutError(f"linear_num_key_heads ({cfg.linear_num_key_heads}) is not divisible by tp ({tp}); "
                              f"choose tp among {_divisors(cfg.linear_num_key_heads)}")
        if self.ulysses > 1:  # Ulysses splits each tp rank's heads once more
            q_local, kv_local = cfg.num_attention_heads // tp, max(1, kv // tp)
            if q_local % self.ulysses:
                raise LayoutError(f"Ulysses degree {self.ulysses} does not divide the {q_local} attention heads per "
                                  f"tp rank ({cfg.num_attention_heads} heads / tp {tp})")
            if kv_local % self.ulysses and self.ulysses % kv_local:
                raise LayoutError(f"Ulysses degree {self.ulysses} and the {kv_local} KV heads per tp rank must "
                                  f"divide one another")
        if cfg.num_layers < self.pp:
            raise LayoutError(f"num_layers ({cfg.num_layers}) is smaller than pp ({self.pp})")
        self._check_experts(cfg)

    def _check_experts(self, cfg) -> None:
        if not cfg.moe_layers:
            if self.ep > 1 or self.etp > 1:
                raise LayoutError(f"parallel.ep={self.ep} / parallel.etp={self.etp} split experts, but this "
                                  f"{cfg.family} model has none; use 1")
            return
        if cfg.num_moe_experts % self.ep:
            raise LayoutError(f"the number of experts ({cfg.num_moe_experts}) is not divisible by ep ({self.ep});"
                              f" choose ep among {_divisors(cfg.num_moe_experts)}")
        if cfg.moe_ffn_hidden_size % self.etp:
            raise LayoutError(f"the expert width moe_intermediate_size ({cfg.moe_ffn_hidden_size}) is not divisible "
                              f"by etp ({self.etp}); choose etp among {_divisors(cfg.moe_ffn_hidden_size)}")

    def seq_multiple(self, moe: bool = False) -> int:
        """What every sequence (every document under cp) is cut into: 2 x cp chunks for context
        parallelism (two per rank, for causal balance), times tp when the tokens are split over
        tp ranks too (sequence parallelism; MoE layers, which route 1/tp of them per tp rank)."""
        split = self.tp if (self.sp or moe) else 1
        return (2 * self.cp if self.cp > 1 else 1) * split

    def check_seq_len(self, seq_len: int, moe: bool = False) -> None:
        m = self.seq_multiple(moe)
        if seq_len % m == 0:
            return
        parts, why = [f"2 x cp ({self.cp})"] if self.cp > 1 else [], ""
        if self.tp > 1 and (self.sp or moe):
            parts.append(f"tp ({self.tp})")
            why = " (parallel.sp splits the sequence over tp)" if self.sp else " (MoE layers split tokens over tp)"
        raise LayoutError(f"sequence length {seq_len} is not divisible by {' x '.join(parts)} = {m}{why}; "
                          f"use a multiple of {m}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
