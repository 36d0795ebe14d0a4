"""Typed run config: one dataclass per YAML section, filled from a file, then from
`--section.key value` overrides, and checked when built, so a typo or a bad value fails with a
one-line ConfigError before any process group starts.

Adding a section (e.g. `dpo`) means writing a `_Checked` dataclass with `_section = "dpo"` and
adding one field to `Config`; loading, overrides, checking and `to_dict` walk the fields
generically.
"""

import copy
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Union

import yaml

from megaswift.errors import ConfigError

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_NONE = ("none", "null")


def _at_least(low, default):
    """A field whose value (when not None) must be >= `low`; checked in `_Checked.__post_init__`."""
    return field(default=default, metadata={"min": low})


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.cache
def _hints(cls) -> dict:
    # get_type_hints resolves string annotations and is slow-ish; every build needs it.
    return typing.get_type_hints(cls)


def _optional_inner(tp):
    """`X` for `X | None` (or Optional[X]), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return None


def _type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return type(args[0]).__name__
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return tp.__name__


def _check(value, tp, key: str, shown=None):
    """Return `value` if it fits `tp` (an int becomes a float for a float field), else raise.
    `shown` is the declared type to name in the message ('int or None', not just 'int')."""
    shown = shown or tp
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _check(value, inner, key, shown)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # compare types too: True == 1, but `zero: true` is a mistake, not ZeRO-1
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, list):
            try:
                return [_check(v, args[0], key) for v in value]
            except ConfigError:
                pass  # report the whole list below, not one element
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, which reads `lr: 1e-5` (no dot) as the string '1e-5'
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        # bool is a subclass of int; `steps: true` is a mistake
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' expects {_type_name(shown)}, got {value!r}")


def _parse(text: str, tp, key: str, shown=None):
    """Convert one command-line string to `tp`; the section's __post_init__ then checks it."""
    shown = shown or tp
    inner = _optional_inner(tp)
    if inner is not None:
        return None if text.strip().lower() in _NONE else _parse(text, inner, key, shown)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _parse(text, type(args[0]), key, shown)
    if origin is list:
        # accept the YAML flow form `[1, 2]` and the shell-friendly `1,2`
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        items = [s.strip().strip("'\"") for s in body.split(",")]
        try:
            return [_parse(s, args[0], key) for s in items if s]
        except ConfigError:  # name the whole list, not one element
            raise ConfigError(
                f"config key '{key}' expects {_type_name(shown)}, got {text!r}"
            ) from None
    if tp is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
    elif tp is str:
        return text
    else:
        try:
            return tp(text)
        except ValueError:
            pass
    raise ConfigError(f"config key '{key}' expects {_type_name(shown)}, got {text!r}")


def _require_field(cls, name: str, prefix: str, tail: str = "") -> None:
    """Raise unless `cls` has field `name`; `tail` is the rest of a dotted override key, kept so
    the message shows the whole key the user typed ('paralel.tp' -> 'parallel.tp')."""
    names = [f.name for f in dataclasses.fields(cls)]
    if name in names:
        return
    # match on this component alone: a shared 'parallel.' prefix would make every key look close
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        hint = f"did you mean '{_join(prefix, close[0])}{tail}'?"
    else:
        hint = "valid keys: " + ", ".join(_join(prefix, n) for n in names)
    raise ConfigError(f"unknown config key '{_join(prefix, name)}{tail}'; {hint}")


@dataclass(kw_only=True)
class _Checked:
    """Base of every section: checks each field against its annotation and `_at_least` bound."""

    _section: ClassVar[str] = ""
    """Dotted name of this section, used in error messages ('' for the root Config)."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key, tp, value = _join(self._section, f.name), hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"config key '{key}' expects a {tp.__name__}, got {value!r}")
                continue
            value = _check(value, tp, key)
            low = f.metadata.get("min")
            if low is not None and value is not None and value < low:
                raise ConfigError(f"{key} must be >= {low}; got {value}")
            setattr(self, f.name, value)

    def to_dict(self) -> dict:
        """Plain nested dicts and lists, safe for yaml.safe_dump and `load_config(base=...)`."""
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class LoraSection(_Checked):
    _section: ClassVar[str] = "model.lora"

    rank: int = _at_least(0, 0)
    """LoRA rank; 0 turns LoRA off and trains every parameter."""
    alpha: float = 16.0
    """Adapter scale numerator: the adapter output is multiplied by alpha / rank."""
    dropout: float = _at_least(0.0, 0.0)
    """Dropout probability on the adapter input."""
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Layers to adapt, by Megatron name (linear_qkv, linear_proj, linear_fc1, linear_fc2),
    or 'all-linear'."""


@dataclass(kw_only=True)
class ModelSection(_Checked):
    _section: ClassVar[str] = "model"

    hf_path: str | None = None
    """Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)."""
    preset: str | None = None
    """Name of a YAML model preset in configs/models/ (file name without .yaml)."""
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
    make_vocab_size_divisible_by: int = _at_least(1, 128)
    """Pad the vocabulary to a multiple of this times tp, so embedding shards are equal."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the checkpoint; off unless the user trusts it."""
    lora: LoraSection = field(default_factory=LoraSection)
    """Low-rank adapters (model.lora.*)."""


@dataclass(kw_only=True)
class ParallelSection(_Checked):
    _section: ClassVar[str] = "parallel"

    tp: int = _at_least(1, 1)
    """Tensor-parallel degree."""
    pp: int = _at_least(1, 1)
    """Pipeline-parallel degree (stages)."""
    vpp: int = _at_least(1, 1)
    """Virtual pipeline chunks per stage (interleaved schedules)."""
    pp_schedule: Literal["1f1b", "interleaved", "zbv", "gpipe"] = "1f1b"
    """Pipeline schedule."""
    pp_layers: list[int] | None = None
    """Decoder layers on each pipeline chunk, in order; None splits the layers evenly."""
    cp: int = _at_least(1, 1)
    """Context-parallel degree: the sequence is split across this many ranks."""
    cp_comm: Literal["ring", "ulysses", "hybrid"] = "ring"
    """How context parallelism exchanges keys/values: ring, Ulysses all-to-all, or both."""
    ulysses: int = _at_least(1, 1)
    """Ulysses degree inside cp when cp_comm is 'hybrid' (the rest of cp runs as a ring)."""
    ep: int = _at_least(1, 1)
    """Expert-parallel degree (MoE models)."""
    etp: int = _at_least(1, 1)
    """Tensor-parallel degree inside each expert."""
    sp: bool = False
    """Sequence parallelism: shard activations outside attention/MLP along the sequence over tp."""
    timeout_s: int = _at_least(1, 600)
    """Seconds a collective may wait before the job fails, so a dead or hung rank ends the run."""
    ddp_bucket_size: int = _at_least(1, 40_000_000)
    """Gradient elements per data-parallel bucket: a bucket's reduction starts as soon as
    backward has produced all of its gradients, overlapping communication with compute."""


@dataclass(kw_only=True)
class MoESection(_Checked):
    _section: ClassVar[str] = "moe"

    aux_loss_coef: float | None = _at_least(0.0, None)
    """Load-balancing loss weight; None follows transformers: the checkpoint's
    router_aux_loss_coef when its output_router_logits is true, else no load-balancing loss."""
    z_loss_coef: float = _at_least(0.0, 0.0)
    """Router z-loss weight (ST-MoE): mean squared log-sum-exp of the router logits per layer."""
    capacity_factor: float | None = None
    """None routes every token to its top-k experts (drop-less); a number caps each expert at
    ceil(capacity_factor x tokens x top-k / experts) of a rank's assignments and drops the
    lowest-probability rest."""
    expert_backend: Literal["auto", "grouped", "loop"] = "auto"
    """Expert compute: one grouped GEMM over a rank's experts (torch._grouped_mm), a loop over
    experts (the reference), or auto (grouped where the kernel supports the shapes)."""

    def __post_init__(self):
        super().__post_init__()
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor must be > 0 (or null for drop-less); got {self.capacity_factor}")


@dataclass(kw_only=True)
class DPOSection(_Checked):
    _section: ClassVar[str] = "dpo"

    beta: float = _at_least(0.0, 0.1)
    """Strength of the KL anchor to the reference model (TRL's beta)."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    """DPO (sigmoid), SLiC (hinge), IPO, or robust DPO with label smoothing."""
    label_smoothing: float = _at_least(0.0, 0.0)
    """Probability that a pair's preference is flipped (robust); must be below 0.5."""
    rpo_alpha: float = _at_least(0.0, 0.0)
    """Weight of an NLL term on the chosen response (RPO): its mean token negative log-likelihood."""
    reference: Literal["auto", "copy", "adapters"] = "auto"
    """Where reference log-probabilities come from when not precomputed: a frozen copy of the
    starting model sharded like the policy, or the policy with its LoRA adapters switched off
    (auto: adapters under LoRA, else a copy)."""
    precompute_ref: bool = False
    """Compute every pair's reference log-probabilities once before training (with the starting
    weights) and keep them with the run, so no reference model is held during training."""
    ref_path: str | None = None
    """Reference weights (an HF directory or a megaswift checkpoint); default: the weights the
    run starts from (model.hf_path, or a weights-only checkpoint.load)."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type == "robust" and not self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be below 0.5 for the robust loss; got {self.label_smoothing}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0; got {self.beta}")


@dataclass(kw_only=True)
class GRPOSection(_Checked):
    _section: ClassVar[str] = "grpo"

    num_generations: int = _at_least(2, 8)
    """Completions sampled per prompt (the group G); train.global_batch_size counts completions."""
    max_new_tokens: int = _at_least(1, 64)
    """Completion length limit in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0); log-probabilities for the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probability reaches top_p."""
    top_k: int = _at_least(0, 0)
    """Keep only the top_k most likely tokens; 0 = off."""
    stop_strings: list[str] = field(default_factory=list)
    """A completion also ends once it contains one of these (the EOS token always ends it)."""
    generation_batch_size: int | None = _at_least(1, None)
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
    epsilon: float = _at_least(0.0, 0.2)
    """Lower clip range of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = _at_least(0.0, None)
    """Upper clip range, 1 + epsilon_high (DAPO's clip-higher); None = epsilon."""
    beta: float = _at_least(0.0, 0.0)
    """Weight of the k3 KL penalty to the reference model; 0 = no reference model at all."""
    num_iterations: int = _at_least(1, 1)
    """Policy updates (optimizer steps) per rollout batch (PPO epochs, mu in the GRPO paper)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (zero advantage) and
    sample more prompts to fill the batch, up to dynamic_sampling_max_rounds rollouts a step."""
    dynamic_sampling_max_rounds: int = _at_least(1, 3)
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


@dataclass(kw_only=True)
class DataSection(_Checked):
    _section: ClassVar[str] = "data"

    path: str | None = None
    """Dataset file or directory."""
    seq_len: int = _at_least(1, 2048)
    """Tokens per training sequence."""
    packing: bool = False
    """Pack several samples into one seq_len row instead of padding each sample."""
    max_prompt_len: int | None = _at_least(1, None)
    """Prompt length limit in tokens (DPO/GRPO); None means only seq_len bounds it."""


@dataclass(kw_only=True)
class TrainSection(_Checked):
    _section: ClassVar[str] = "train"

    steps: int = _at_least(1, 100)
    """Optimizer steps to run."""
    micro_batch_size: int = _at_least(1, 1)
    """Samples per forward/backward pass on each dp rank."""
    global_batch_size: int | None = _at_least(1, None)
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
    max_skipped_steps: int = _at_least(1, 5)
    """With on_nonfinite skip: how many non-finite steps in a row end the run anyway."""

    def global_batch(self, dp: int) -> int:
        """global_batch_size, or its default: one micro batch per dp rank."""
        return self.global_batch_size or self.micro_batch_size * dp


@dataclass(kw_only=True)
class OptimSection(_Checked):
    _section: ClassVar[str] = "optim"

    lr: float = _at_least(0.0, 1e-5)
    """Peak learning rate."""
    min_lr: float = _at_least(0.0, 0.0)
    """Learning rate at the end of the decay."""
    warmup_steps: int = _at_least(0, 0)
    """Steps of linear warmup from 0 to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr after warmup."""
    weight_decay: float = _at_least(0.0, 0.0)
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = _at_least(0.0, 1.0)
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
class CheckpointSection(_Checked):
    _section: ClassVar[str] = "checkpoint"

    every: int = _at_least(0, 0)
    """Save every N steps; 0 saves only at the end."""
    keep: int | None = _at_least(1, None)
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
class LogSection(_Checked):
    _section: ClassVar[str] = "log"

    wandb: bool = False
    """Send metrics to Weights & Biases."""
    tensorboard: bool = False
    """Write TensorBoard event files to output_dir."""
    every: int = _at_least(1, 1)
    """Print and send to trackers every N steps."""


@dataclass(kw_only=True)
class Config(_Checked):
    """The whole run config. Field names are the YAML section names."""

    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    moe: MoESection = field(default_factory=MoESection)
    dpo: DPOSection = field(default_factory=DPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}  # an empty YAML section (`log:` with nothing under it) loads as None
    if not isinstance(raw, dict):
        what = f"config section '{prefix}'" if prefix else "config"
        raise ConfigError(f"{what} expects a mapping, got {raw!r}")
    hints, kwargs = _hints(cls), {}
    for name, value in raw.items():
        name = str(name)
        _require_field(cls, name, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value, _join(prefix, name))
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(d: dict) -> Config:
    """Build a Config from nested dicts (as `Config.to_dict` or a YAML file gives), checking every
    key and value."""
    return _build(Config, d, "")


def _resolve(dotted: str):
    """The declared type of a dotted override key such as 'model.lora.rank'."""
    tp, prefix, parts = Config, "", dotted.split(".")
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
