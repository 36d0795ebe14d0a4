"""Supervised fine-tuning: chat data, loss on the assistant tokens only."""
from __future__ import annotations

from megaswift import device

from .algorithm import Algorithm


class SFT(Algorithm):
    name = "sft"

    def build_data(self, ctx):
        from megaswift.data import SFTDataset, SFTLoader

        cfg = ctx.cfg
        tokenizer = ctx.tokenizer()
        dataset = SFTDataset(cfg.data.path, tokenizer, cfg.data.seq_len)
        loader = SFTLoader(dataset, packing=cfg.data.packing, **ctx.loader_args(tokenizer))
        if device.rank() == 0:
            dropped = f", {loader.dropped} dropped (no assistant token within data.seq_len)" if loader.dropped else ""
            print(f"data: {len(dataset)} samples from {cfg.data.path}{dropped}; "
                  f"{loader.items_per_epoch} {'packed rows' if cfg.data.packing else 'samples'} per epoch", flush=True)
        return loader

    def count(self, micro_batch: dict) -> int:
        return int((micro_batch["labels"] != -100).sum())

    def loss_from_output(self, per_token_loss, mb: dict):
        return per_token_loss.sum(), {}
