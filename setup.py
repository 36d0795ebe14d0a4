"""Packaging for megaswift.

Every package lives under megaswift/: a directory with a generic name (`kernels`, `parallel`)
at the top of the checkout shadows the installed package of that name for anything run from the
checkout (`python -m ...` puts the working directory first on sys.path); transformers 5.25
imports the Hugging Face `kernels` package, so a top-level `kernels/` broke it.

torch is pinned loosely here on purpose: `scripts/install.sh` installs the right build first
(CPU wheel on a machine without CUDA), and a range that build satisfies installs nothing more.
"""
from setuptools import setup

setup(
    name="megaswift",
    version="0.1.0",
    description="Megatron-style parallel training of LLMs on PyTorch, tested on CPU and GPU",
    python_requires=">=3.10",
    packages=[
        "megaswift",
        "megaswift.models",
        "megaswift.convert",
        "megaswift.checkpoint",
        "megaswift.data",
        "megaswift.recipes",
        "megaswift.train",
        "megaswift.rollout",
        "megaswift.testing",
        "megaswift.parallel",
        "megaswift.kernels",
        "megaswift.launch",
    ],
    install_requires=[
        "torch>=2.6",
        "transformers>=4.51",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pyyaml>=6",
        "numpy",
        "datasets>=2.18",
        "tqdm",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6", "triton>=3.0"],
        "wandb": ["wandb"],
        "ray": ["ray>=2.9"],
        "tensorboard": ["tensorboard"],
        "test": ["pytest>=8", "pytest-timeout", "tensorboard", "trl>=1.0", "peft>=0.15"],
    },
    entry_points={"console_scripts": ["megaswift=megaswift.cli:main"]},
)
