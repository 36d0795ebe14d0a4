"""A real training step's communication, counted by the planner's accountant, beside the
planner's arithmetic prediction (megaswift/planner/comm.py), on one gloo rank."""
from __future__ import annotations

from tests.helpers.train import train_config


def nested(comm: dict) -> dict[str, dict[str, int]]:
    """StepAccountant.comm {(class, kind): [calls, bytes]} -> {class: {kind: bytes}}."""
    out: dict[str, dict[str, int]] = {}
    for (cls, kind), (_calls, nbytes) in sorted(comm.items()):
        if nbytes:
            out.setdefault(cls, {})[kind] = nbytes
    return out


def measure_step(rank, world, hf_dir, data, output_dir, algorithm="sft", **overrides) -> tuple[dict, dict]:
    """(measured, predicted) {class: {kind: bytes}} of this rank's second training step of
    `algorithm` (sft, or dpo on preference data): the first warms up (the pipeline exchanges
    shape metadata once)."""
    from megaswift.planner.accountant import StepAccountant
    from megaswift.planner.comm import predict_comm
    from megaswift.planner.dry_run import group_classes
    from megaswift.train.build import build_trainer
    from megaswift.train.registry import algorithm_class

    cfg = train_config(hf_dir, data, output_dir, **overrides)
    trainer = build_trainer(cfg, algorithm_class(algorithm)())
    try:
        trainer.train_step(trainer.data.next_global_batch())
        batches = trainer.data.next_global_batch()
        with StepAccountant(group_classes(trainer.st)) as acct:
            trainer.train_step(batches)
    finally:
        trainer.logger.close()
    return nested(acct.comm), predict_comm(cfg, trainer.model.cfg, world, rank, algorithm=algorithm)
