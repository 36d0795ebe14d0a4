"""Supervised fine-tuning: chat data, loss on the assistant tokens only."""
from __future__ import annotations

from megaswift import device

from .engine import Algorithm


class SFT(Algorithm):
    name = "sft"

    def build_data(self, trainer):
        from megaswift.data import SFTDataset, SFTLoader

        cfg = trainer.cfg
        tokenizer, loader_args = loader_setup(trainer)
        dataset = SFTDataset(cfg.data.path, tokenizer, cfg.data.seq_len)
        loader = SFTLoader(dataset, packing=cfg.data.packing, **loader_args)
        if device.rank() == 0:
            dropped = f", {loader.dropped} dropped (no assistant token within data.seq_len)" if loader.dropped else ""
            print(f"data: {len(dataset)} samples from {cfg.data.path}{dropped}; "
                  f"{loader.items_per_epoch} {'packed rows' if cfg.data.packing else 'samples'} per epoch", flush=True)
        return loader

    def count(self, micro_batch: dict) -> int:
        return int((micro_batch["labels"] != -100).sum())

    def loss_from_output(self, per_token_loss, mb: dict):
        return per_token_loss.sum(), {}


def loader_setup(trainer) -> tuple[object, dict]:
    """The run's tokenizer and the loader arguments every algorithm shares (batch sizes, this
    rank's dp coordinates, seed, padding id)."""
    from transformers import AutoTokenizer

    cfg, st, t = trainer.cfg, trainer.st, trainer.cfg.train
    tokenizer = AutoTokenizer.from_pretrained(trainer.source_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, dict(seq_len=cfg.data.seq_len, micro_batch_size=t.micro_batch_size,
                           global_batch_size=t.global_batch(st.dp_size), dp_rank=st.dp_rank, dp_size=st.dp_size,
                           seed=t.seed, pad_id=pad or 0)


def run(cfg) -> dict:
    from .build import build_trainer

    trainer = build_trainer(cfg, SFT())
    return trainer.train()
