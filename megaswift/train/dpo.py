"""Direct preference optimisation on the shared engine: a batch builder (preference pairs), the
reference log-probabilities, and the loss; everything else is the SFT engine.

Sequence log-probabilities come from the model's vocab-parallel cross-entropy (the per-token
loss is -log p of each label, computed without gathering the vocabulary on one rank), summed
over the response tokens. Under context parallelism each cp rank sums its own tokens and the
sums are all-reduced (backward: identity), so every cp rank holds the whole pair's loss; under
pipeline parallelism it all happens on the last stage.

Reference log-probabilities, three ways (`dpo.reference`, `dpo.precompute_ref`), all equal:
- copy: a frozen model sharded like the policy, loaded from the starting weights;
- adapters: under LoRA, the policy itself with its adapters switched off (no second copy);
- precompute: every pair's reference log-probabilities computed once before training and kept
  in `<output_dir>/ref_logps.pt`, looked up by pair index at each step.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from megaswift import device
from megaswift.errors import ConfigError
from megaswift.parallel.tp_comm import group_size, reduce_from_tp_region

from .dpo_loss import dpo_loss
from .engine import Algorithm

REF_FILE = "ref_logps.pt"


def sequence_logps(per_token_loss: torch.Tensor, labels: torch.Tensor, cp_group=None):
    """(summed log-probabilities [rows], response tokens [rows]) of each row's labelled tokens;
    all-reduced over the cp group when the rows are cp shards."""
    logps = -per_token_loss.sum(-1)
    tokens = (labels != -100).sum(-1).to(logps.dtype)
    if group_size(cp_group) > 1:
        logps = reduce_from_tp_region(logps, cp_group)  # forward: sum; backward: identity
        tokens = tokens.clone()
        dist.all_reduce(tokens, group=cp_group)
    return logps, tokens


class DPO(Algorithm):
    name = "dpo"
    loss_replicated_over_cp = True  # a pair's loss is whole on every cp rank (see engine)
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")

    def build_data(self, trainer):
        from megaswift.data.preference import PreferenceDataset, PreferenceLoader

        from .sft import loader_setup

        cfg = trainer.cfg
        self.trainer, self.cfg = trainer, cfg.dpo
        tokenizer, loader_args = loader_setup(trainer)
        dataset = PreferenceDataset(cfg.data.path, tokenizer, cfg.data.seq_len, cfg.data.max_prompt_len)
        loader = PreferenceLoader(dataset, **loader_args)
        self.mode = self._reference_mode(cfg)
        if device.rank() == 0:
            dropped = f", {dataset.dropped} dropped (no response token within data.seq_len)" if dataset.dropped else ""
            print(f"data: {len(dataset)} preference pairs from {cfg.data.path}{dropped}; reference: {self.mode}",
                  flush=True)
        self.ref_model = None
        if self.mode == "copy":
            self.ref_model = self._load_reference()
        elif self.mode == "precompute":
            self.table = self._reference_table(loader)
        return loader

    def _reference_mode(self, cfg) -> str:
        if cfg.dpo.precompute_ref:
            return "precompute"
        return reference_mode(cfg, "dpo")

    # -- reference log-probabilities -------------------------------------------------------------
    def _load_reference(self):
        return load_reference(self.trainer, reference_source(self.trainer.cfg, self.cfg.ref_path))

    def _reference_context(self):
        return reference_context(self.trainer.model, self.mode)

    @torch.no_grad()
    def _reference_logps(self, mb: dict) -> torch.Tensor | None:
        """[pairs, 2] (chosen, rejected) on the ranks that compute the loss, else None."""
        model = self.ref_model if self.ref_model is not None else self.trainer.model
        with self._reference_context():
            out = forward_without_schedule(model, self.forward_inputs(mb))
        if out is None:
            return None
        logps, _ = sequence_logps(out, mb["labels"], self.trainer.st.cp_group)
        m = logps.shape[0] // 2
        return torch.stack([logps[:m], logps[m:]], dim=1).double()

    def _reference_table(self, loader) -> torch.Tensor:
        """[pairs, 2] reference log-probabilities of every pair, computed once (or read back from
        `<output_dir>/ref_logps.pt` on resume) and the same on every rank."""
        tr = self.trainer
        path = os.path.join(tr.output_dir, REF_FILE)
        n = len(loader.dataset)
        if tr.resume_dir is not None and os.path.isfile(path):
            table = torch.load(path, weights_only=True)
            if table.shape == (n, 2):
                return table
        # on a fresh run the policy holds the starting weights; a resumed one has moved on
        model_is_reference = tr.resume_dir is None and self.cfg.ref_path is None
        self.ref_model = None if model_is_reference else self._load_reference()
        table = compute_table(self, loader, n)
        self.ref_model = None
        if device.rank() == 0:
            os.makedirs(tr.output_dir, exist_ok=True)
            torch.save(table, path)
        return table

    # -- the engine's hooks ----------------------------------------------------------------------
    def before_step(self, micro_batches: list[dict]) -> None:
        for mb in micro_batches:
            if self.mode == "precompute":
                mb["ref_logps"] = self.table[mb["pair_index"].cpu()].to(mb["input_ids"].device)
            else:
                mb["ref_logps"] = self._reference_logps(mb)

    def count(self, mb: dict) -> int:
        return int(mb["pair_index"].numel())

    def loss_from_output(self, per_token_loss, mb: dict):
        c = self.cfg
        logps, tokens = sequence_logps(per_token_loss, mb["labels"], self.trainer.st.cp_group)
        m = logps.shape[0] // 2
        chosen, rejected = logps[:m], logps[m:]
        ref = mb["ref_logps"].to(logps.dtype)
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], loss_type=c.loss_type,
                                                beta=c.beta, label_smoothing=c.label_smoothing,
                                                chosen_tokens=tokens[:m], rejected_tokens=tokens[m:])
        if c.rpo_alpha:  # RPO: the chosen response's mean token NLL
            losses = losses + c.rpo_alpha * (-chosen / tokens[:m].clamp_min(1))
        extra = {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
                 "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
                 "rewards/margins": (chosen_r - rejected_r).sum(),
                 "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
        return losses.sum(), extra


def forward_without_schedule(model, inputs: dict):
    """The model's output on one micro batch without a pipeline schedule: the per-token loss
    (or logits) on the ranks holding the last stage, None elsewhere."""
    if hasattr(model, "forward_stages"):
        return model.forward_stages(**inputs)
    return model(**inputs)


def compute_table(alg: DPO, loader, n: int) -> torch.Tensor:
    """Every pair's reference log-probabilities: dp ranks split the pairs (each forward padded
    to the same count, since MoE models reduce statistics over dp), the last stage fills them,
    and sums over dp and pp give every rank the whole table."""
    tr, st = alg.trainer, alg.trainer.st
    mbs = loader.micro_batch_size
    mine = list(range(st.dp_rank, n, st.dp_size))
    per_rank = -(-n // st.dp_size)
    rounds = -(-per_rank // mbs)
    table = torch.zeros(n, 2, dtype=torch.float64, device=tr.device)
    for k in range(rounds):
        chunk = mine[k * mbs: (k + 1) * mbs]
        real = len(chunk)
        chunk = chunk + [0] * (mbs - real)  # padding forwards keep the ranks in step
        mb = tr.prepare_micro_batch(loader._collate([[i] for i in chunk]))
        with tr._autocast():
            logps = alg._reference_logps(mb)
        if logps is not None and real:
            table[torch.tensor(chunk[:real], device=tr.device)] = logps[:real].to(table)
    for group in (st.dp_group, st.pp_group):
        if group_size(group) > 1:
            dist.all_reduce(table, group=group)
    return table.cpu()


def reference_mode(cfg, section: str) -> str:
    """`<section>.reference` resolved: copy or adapters."""
    lora = cfg.model.lora.rank > 0
    sec = getattr(cfg, section)
    mode = sec.reference
    if mode == "auto":
        mode = "adapters" if lora and sec.ref_path is None else "copy"
    if mode == "adapters" and not lora:
        raise ConfigError(f"{section}.reference: adapters needs LoRA (model.lora.rank > 0): without adapters the "
                          "policy has no frozen base to serve as the reference")
    return mode


def reference_context(model, mode: str):
    """Where the policy itself is the reference (adapters off), the context that makes it so."""
    return model.adapters_disabled() if mode == "adapters" else contextlib.nullcontext()


def load_reference(trainer, source: str):
    """A frozen model sharded like the policy, filled from `source` (reference_source)."""
    from megaswift.commands import build_model

    from .build import load_weights

    cfg = trainer.cfg
    ref = build_model(cfg, trainer.model.cfg, trainer.st, torch.float32)
    load_weights(ref, source)
    for p in ref.parameters():
        p.requires_grad_(False)
    ref.set_attention_backend(cfg.model.attention_backend)
    ref.logits_temperature = trainer.model.logits_temperature
    if trainer.model.cfg.moe_layers:
        ref.set_moe_options(aux_loss_coef=0.0, capacity_factor=cfg.moe.capacity_factor,
                            backend=cfg.moe.expert_backend)
    return ref.eval()


def reference_source(cfg, ref_path: str | None) -> str:
    """`ref_path`, else the weights the run starts from."""
    from megaswift.checkpoint.model_state import META_FILE, read_meta

    if ref_path:
        return ref_path
    if cfg.model.hf_path:
        return cfg.model.hf_path
    load = cfg.checkpoint.load
    if load and load != "latest" and os.path.isfile(os.path.join(load, META_FILE)) and "train" not in read_meta(load):
        return load
    raise ConfigError("the reference model needs weights: set dpo.ref_path / grpo.ref_path (an HF directory or a "
                      "megaswift checkpoint), or model.hf_path to the model the run started from")


def run(cfg) -> dict:
    from .build import build_trainer

    trainer = build_trainer(cfg, DPO())
    return trainer.train()
