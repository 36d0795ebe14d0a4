"""Nothing megaswift loads is unpickled beyond an allow-list (design.md, principle 7).

A crafted checkpoint file once ran its payload through DCP's metadata reader, which unpickles
freely, in a path (LoRA export) that was not routed through the safe reader. This scans the
library for the calls that unpickle, so a new path cannot slip past the review."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNSAFE = re.compile(r"pickle\.loads?\(|weights_only=False|\bFileSystemReader\(|\.read_metadata\(\)|torch\.load\(")
ALLOWED = {os.path.join("megaswift", "checkpoint", "safe_load.py")}  # the allow-listed reader itself


def test_only_the_safe_reader_unpickles():
    hits = []
    for top in ("megaswift",):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT)
                if not name.endswith(".py") or rel in ALLOWED:
                    continue
                for i, line in enumerate(open(path), start=1):
                    if UNSAFE.search(line) and "weights_only=True" not in line:
                        hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "unpickling outside megaswift/checkpoint/safe_load.py:\n" + "\n".join(hits)
