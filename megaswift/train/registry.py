"""The algorithms `megaswift train` knows: name -> "module:class". Adding one is a new module
with an `Algorithm` subclass (train/algorithm.py) and one line here.

Entries are strings, imported on first use, so a command that trains with SFT does not import
what GRPO needs; the config reads every algorithm's section from here (`config_sections`).
"""
from __future__ import annotations

import importlib

ALGORITHMS = {
    "sft": "megaswift.train.sft:SFT",
    "dpo": "megaswift.train.dpo:DPO",
    "grpo": "megaswift.train.grpo:GRPO",
    "kto": "megaswift.train.kto:KTO",
}


def algorithm_class(name: str):
    from megaswift.errors import ConfigError

    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; megaswift trains {', '.join(ALGORITHMS)}")
    module, _, cls = ALGORITHMS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def config_sections() -> dict[str, type]:
    """{algorithm name: its config section dataclass} for the algorithms that have one."""
    out = {}
    for name in ALGORITHMS:
        section = algorithm_class(name).config_section
        if section is not None:
            out[name] = section
    return out
