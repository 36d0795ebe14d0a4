"""The run config: the core sections (model, parallel, moe, data, train, optim, checkpoint, log)
and one section per algorithm (declared by the algorithm, train/registry.py), filled from a
YAML file, then from `--section.key value` overrides, and checked when built
(megaswift/section.py), so a typo or a bad value fails with a one-line ConfigError before any
process group starts.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from megaswift.errors import ConfigError
from megaswift.section import Section, _hints, _join, _parse, _require_field, at_least

REMOVED_KEYS = {
    "model.preset": "model.preset was removed (no presets existed): set model.hf_path to an HF checkpoint",
    "model.trust_remote_code": "model.trust_remote_code was removed: megaswift never runs code shipped with a "
                               "checkpoint; its families are built in (convert/families.py)",
}


@dataclass(kw_only=True)
class LoraSection(Section):
    _section: ClassVar[str] = "model.lora"

    rank: int = at_least(0, 0)
    """LoRA rank; 0 turns LoRA off and trains every parameter."""
    alpha: float = 16.0
    """Adapter scale numerator: the adapter output is multiplied by alpha / rank."""
    dropout: float = at_least(0.0, 0.0)
    """Dropout probability on the adapter input."""
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Layers to adapt, by Megatron name (linear_qkv, linear_proj, linear_fc1, linear_fc2),
    or 'all-linear'."""


@dataclass(kw_only=True)
class ModelSection(Section):
    _section: ClassVar[str] = "model"

    hf_path: str | None = None
    """Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype. verify and import-hf: the parameters' dtype. Training: the master weights
    stay float32 and this is the autocast dtype, on CUDA (on CPU only with cpu_autocast);
    float16 is refused for training (no loss scaling: its gradients underflow)."""
    cpu_autocast: bool = False
    """Train under autocast in model.dtype on CPU too, instead of float32. Slower than float32 on
    most CPUs; it exists to test the mixed-precision path without a GPU."""
    attention_backend: Literal["auto", "reference", "sdpa", "flash_attn"] = "auto"
    """Attention kernel; 'auto' picks the fastest one available, 'reference' is the plain torch
    version that tests compare against."""
    make_vocab_size_divisible_by: int = at_least(1, 128)
    """Pad the vocabulary to a multiple of this times tp, so embedding shards are equal."""
    lora: LoraSection = field(default_factory=LoraSection)
    """Low-rank adapters (model.lora.*)."""


@dataclass(kw_only=True)
class ParallelSection(Section):
    _section: ClassVar[str] = "parallel"

    tp: int = at_least(1, 1)
    """Tensor-parallel degree."""
    pp: int = at_least(1, 1)
    """Pipeline-parallel degree (stages)."""
    vpp: int = at_least(1, 1)
    """Virtual pipeline chunks per stage (interleaved schedules)."""
    pp_schedule: Literal["1f1b", "interleaved", "zbv", "gpipe"] = "1f1b"
    """Pipeline schedule."""
    pp_layers: list[int] | None = None
    """Decoder layers on each pipeline chunk, in order; None splits the layers evenly."""
    cp: int = at_least(1, 1)
    """Context-parallel degree: the sequence is split across this many ranks."""
    cp_comm: Literal["ring", "ulysses", "hybrid"] = "ring"
    """How context parallelism exchanges keys/values: ring, Ulysses all-to-all, or both."""
    ulysses: int = at_least(1, 1)
    """Ulysses degree inside cp when cp_comm is 'hybrid' (the rest of cp runs as a ring)."""
    ep: int = at_least(1, 1)
    """Expert-parallel degree (MoE models)."""
    etp: int = at_least(1, 1)
    """Tensor-parallel degree inside each expert."""
    sp: bool = False
    """Sequence parallelism: shard activations outside attention/MLP along the sequence over tp."""
    timeout_s: int = at_least(1, 600)
    """Seconds a collective may wait before the job fails, so a dead or hung rank ends the run."""
    ddp_bucket_size: int = at_least(1, 40_000_000)
    """Gradient elements per data-parallel bucket: a bucket's reduction starts as soon as
    backward has produced all of its gradients, overlapping communication with compute."""


@dataclass(kw_only=True)
class MoESection(Section):
    _section: ClassVar[str] = "moe"

    aux_loss_coef: float | None = at_least(0.0, None)
    """Load-balancing loss weight; None follows transformers: the checkpoint's
    router_aux_loss_coef when its output_router_logits is true, else no load-balancing loss."""
    aux_loss_type: Literal["global", "seq"] = "global"
    """Which load-balancing loss aux_loss_coef weighs: global is transformers' E sum_e f_e P_e
    over every MoE layer and token of the global micro batch at once; seq is DeepSeek-V3's
    sequence-wise loss, sum_e f_e P_e per layer and batch row (f_e = E / (k T) x the row's
    assignments to e, P_e = the row's mean probability of e), averaged over the rows and summed
    over the layers. A packed row counts as one sequence (Megatron's rule). docs/moe.md."""
    bias_update_rate: float = at_least(0.0, 0.0)
    """Auxiliary-loss-free load balancing (DeepSeek-V3): after each optimizer step every router's
    expert bias moves by rate x sign(mean load - expert load), the loads counted over the step's
    tokens on every rank. 0 leaves the bias as loaded; DeepSeek-V3 and Megatron use 1e-3.
    Only for routers with an expert bias (deepseek_v3, glm4_moe), not with LoRA. docs/moe.md."""
    z_loss_coef: float = at_least(0.0, 0.0)
    """Router z-loss weight (ST-MoE): mean squared log-sum-exp of the router logits per layer."""
    capacity_factor: float | None = None
    """None routes every token to its top-k experts (drop-less); a number caps each expert at
    ceil(capacity_factor x tokens x top-k / experts) of a rank's assignments and drops the
    lowest-probability rest."""
    expert_backend: Literal["auto", "grouped", "loop"] = "auto"
    """Expert compute: one grouped GEMM over a rank's experts (torch._grouped_mm), a loop over
    experts (the reference), or auto (grouped where the kernel supports the shapes)."""
    router_force_balance: bool = False
    """For benchmarks and dry runs only, never to train a model: every expert gets the same share
    of the tokens (assignment j of token t goes to expert (t k + j) mod E) whatever the router
    says; the router still weighs each token's experts. Megatron's
    moe_router_force_load_balancing, made deterministic."""

    def __post_init__(self):
        super().__post_init__()
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor must be > 0 (or null for drop-less); got {self.capacity_factor}")
        if self.router_force_balance and self.capacity_factor is not None and self.capacity_factor < 1:
            raise ConfigError(f"moe.router_force_balance spreads tokens evenly, so moe.capacity_factor="
                              f"{self.capacity_factor} < 1 would drop a fixed share of them; use >= 1 or null")


@dataclass(kw_only=True)
class DataSection(Section):
    _section: ClassVar[str] = "data"

    path: str | None = None
    """Dataset file or directory."""
    seq_len: int = at_least(1, 2048)
    """Tokens per training sequence."""
    packing: bool = False
    """Pack several samples into one seq_len row instead of padding each sample."""
    max_prompt_len: int | None = at_least(1, None)
    """Prompt length limit in tokens (DPO/GRPO); None means only seq_len bounds it."""


@dataclass(kw_only=True)
class TrainSection(Section):
    _section: ClassVar[str] = "train"

    steps: int = at_least(1, 100)
    """Optimizer steps to run."""
    micro_batch_size: int = at_least(1, 1)
    """Samples per forward/backward pass on each dp rank."""
    global_batch_size: int | None = at_least(1, None)
    """Samples per optimizer step; None means micro_batch_size * dp (no gradient accumulation)."""
    seed: int = 1234
    """Random seed for initialisation, data order and dropout."""
    output_dir: str = "outputs/run"
    """Where checkpoints, metrics.jsonl and logs go."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (attention core only) or full (whole layers)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is inf/NaN (on any rank): stop names the step and the
    last good checkpoint and ends the run; skip drops that step's update and goes on."""
    max_skipped_steps: int = at_least(1, 5)
    """With on_nonfinite skip: how many non-finite steps in a row end the run anyway."""

    def global_batch(self, dp: int) -> int:
        """global_batch_size, or its default: one micro batch per dp rank."""
        return self.global_batch_size or self.micro_batch_size * dp


@dataclass(kw_only=True)
class OptimSection(Section):
    _section: ClassVar[str] = "optim"

    lr: float = at_least(0.0, 1e-5)
    """Peak learning rate."""
    min_lr: float = at_least(0.0, 0.0)
    """Learning rate at the end of the decay."""
    warmup_steps: int = at_least(0, 0)
    """Steps of linear warmup from 0 to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr after warmup."""
    weight_decay: float = at_least(0.0, 0.0)
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = at_least(0.0, 1.0)
    """Clip the global gradient norm to this; 0 disables clipping."""
    zero: Literal[0, 1] = 0
    """ZeRO stage: 0 replicates optimizer state on every dp rank, 1 shards it across dp."""

    def __post_init__(self):
        super().__post_init__()
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr:g} is above optim.lr={self.lr:g}: the schedule would "
                              f"raise the learning rate as it decays; set min_lr <= lr")
        for key in ("adam_beta1", "adam_beta2"):
            beta = getattr(self, key)
            if not 0 <= beta < 1:  # beta = 1 never forgets its first moment; torch refuses it with a traceback
                raise ConfigError(f"optim.{key} must be in [0, 1); got {beta:g}")
        if self.adam_eps <= 0:  # eps = 0 divides by zero where a gradient entry is 0: NaN weights
            raise ConfigError(f"optim.adam_eps must be > 0 (e.g. 1e-8); got {self.adam_eps:g}")


@dataclass(kw_only=True)
class CheckpointSection(Section):
    _section: ClassVar[str] = "checkpoint"

    every: int = at_least(0, 0)
    """Save every N steps; 0 saves only at the end."""
    keep: int | None = at_least(1, None)
    """How many recent checkpoints to keep; None keeps all."""
    load: str | None = None
    """Checkpoint directory to resume from, or 'latest' for the newest one in output_dir."""
    export_hf: bool = False
    """Write a Hugging Face checkpoint at the end of the run (to export_dir)."""
    export_dir: str | None = None
    """Where export_hf writes; default <train.output_dir>/hf."""
    export_overwrite: bool = False
    """Let export_hf replace the HF files of a non-empty export_dir (like export-hf --overwrite);
    without it the run refuses such a directory before it starts. The model's own source
    directory is refused either way."""


@dataclass(kw_only=True)
class LogSection(Section):
    _section: ClassVar[str] = "log"

    wandb: bool = False
    """Send metrics to Weights & Biases."""
    tensorboard: bool = False
    """Write TensorBoard event files to output_dir."""
    every: int = at_least(1, 1)
    """Print and send to trackers every N steps."""


CORE_SECTIONS = {"model": ModelSection, "parallel": ParallelSection, "moe": MoESection, "data": DataSection,
                 "train": TrainSection, "optim": OptimSection, "checkpoint": CheckpointSection, "log": LogSection}


_CLASSES: dict = {}


def config_class():
    """The whole run config's class: the core sections, then each registered algorithm's
    (`cfg.dpo`, `cfg.grpo`). Field names are the YAML section names. Built once per set of
    registered algorithms."""
    from megaswift.train.registry import ALGORITHMS, config_sections

    key = tuple(sorted(ALGORITHMS.items()))
    if key not in _CLASSES:
        sections = {**CORE_SECTIONS, **config_sections()}
        fields = [(name, cls, field(default_factory=cls)) for name, cls in sections.items()]
        _CLASSES[key] = dataclasses.make_dataclass("Config", fields, bases=(Section,), kw_only=True,
                                                   namespace={"__module__": __name__})
    return _CLASSES[key]


Config = config_class()  # with the algorithms megaswift ships


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}  # an empty YAML section (`log:` with nothing under it) loads as None
    if not isinstance(raw, dict):
        what = f"config section '{prefix}'" if prefix else "config"
        raise ConfigError(f"{what} expects a mapping, got {raw!r}")
    hints, kwargs = _hints(cls), {}
    for name, value in raw.items():
        name = str(name)
        _check_removed(_join(prefix, name))
        _require_field(cls, name, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value, _join(prefix, name))
        kwargs[name] = value
    return cls(**kwargs)


def _check_removed(key: str) -> None:
    if key in REMOVED_KEYS:
        raise ConfigError(REMOVED_KEYS[key])


def config_from_dict(d: dict) -> Config:
    """Build a Config from nested dicts (as `Config.to_dict` or a YAML file gives), checking every
    key and value."""
    return _build(config_class(), d, "")


def _resolve(dotted: str):
    """The declared type of a dotted override key such as 'model.lora.rank'."""
    _check_removed(dotted)
    tp, prefix, parts = config_class(), "", dotted.split(".")
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{dotted}'; '{prefix}' has no sub-keys")
        _require_field(tp, name, prefix, "".join("." + p for p in parts[i + 1 :]))
        tp, prefix = _hints(tp)[name], _join(prefix, name)
    if dataclasses.is_dataclass(tp):
        first = dataclasses.fields(tp)[0].name
        raise ConfigError(
            f"config key '{dotted}' is a section; set one of its keys, e.g. --{dotted}.{first}"
        )
    return tp


def _parse_overrides(tokens: list[str]) -> dict:
    out: dict = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(
                f"unexpected argument {tok!r}; overrides look like --section.key value"
            )
        key, eq, text = tok[2:].partition("=")
        tp = _resolve(key)
        if eq:
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            text, i = tokens[i + 1], i + 2
        elif tp is bool:
            text, i = "true", i + 1  # a bare flag switches a bool on
        else:
            raise ConfigError(f"override '--{key}' is missing its value")
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse(text, tp, key)
    return out


def _merge(dst: dict, src: dict) -> None:
    """Deep-merge `src` into `dst`; later sources win key by key, not section by section."""
    for k, v in src.items():
        if v is None and isinstance(dst.get(k), dict):
            continue  # an empty YAML section (`log:`) adds nothing; it must not wipe `base`
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        one_line = " ".join(str(e).split())  # PyYAML's messages span several lines
        raise ConfigError(f"config file '{path}' is not valid YAML: {one_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must be a mapping of sections (model, parallel, ...), "
            f"got {type(data).__name__}"
        )
    return data


def load_config(
    path: str | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Config:
    """Build a Config from `base` (nested dicts), then the YAML file at `path`, then the CLI
    `overrides` (`--parallel.tp 2`, `--train.steps=10`, bare `--parallel.sp`), each on top of the
    one before."""
    raw = copy.deepcopy(base) if base else {}
    if path is not None:
        _merge(raw, _read_yaml(path))
    if overrides:
        _merge(raw, _parse_overrides(overrides))
    return config_from_dict(raw)
