"""What the tests share, imported as `from tests.helpers.<module> import ...`:

- train: generated chat/preference/prompt data sets, configs, and Trainer runs on one rank
- model: the model parity helpers (a rank's logits and canonical gradient pieces)
- cli: the one CLI runner (`megaswift(...)`), the one-line-error check, process-tree cleanup
- hf: reading an HF directory's safetensors
- slurm_cluster: a real local Slurm for tests/e2e/test_slurm.py
- grpo_rewards: reward plugins that tests name BY FILE PATH (train.GRPO_REWARDS), never import

Resolved from the checkout, which pytest.ini (`pythonpath = .`) puts on sys.path; no test edits
sys.path. Child processes: the gloo workers of megaswift.testing.dist come from multiprocessing's
forkserver, which starts with the parent's sys.path, so they unpickle `tests.helpers.train.run_steps`
and `tests.dist.test_*` functions by name; `python -m megaswift` children import no test code (the
trainer loads grpo_rewards.py by its file path).
"""
