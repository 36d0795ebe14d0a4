"""The user docs (README.md and docs/*.md) stay true: every relative link reaches an existing file
and heading, every repository file they name exists, and every megaswift command they show in a
```bash / ```sh / ```console block is accepted by megaswift's own parser (`megaswift.cli.parse`:
the subcommand, its options, and the dotted config overrides with their values).

A failure names the file, the line and the command. Placeholders (HF_DIR, CKPT, my.yaml) are fine
where a path goes; a `--config` under configs/ must exist and is loaded; `$VAR` stands for 1.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from megaswift.cli import parse
from megaswift.errors import MegaswiftError

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# repository files named anywhere in a page: configs/sft_pp.yaml, scripts/gpu_check.sh, ...
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:megaswift|scripts|benchmarks|configs|slurm|tests|parallel|kernels|launch)/[\w./-]*"
    r"\.(?:py|sh|yaml|sbatch|md))\b")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path):
    """The heading anchors of a page, GitHub-style (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1
            yield s if seen[s] == 0 else f"{s}-{seen[s]}"


def shell_commands(text: str):
    """(line number, command text) for each command in the shell blocks: continuations joined;
    in a console block only the `$ ` lines are commands, the rest is output."""
    lang, pending, start = None, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if m:
            lang = (m.group(1) or "-") if lang is None else None
            continue
        if lang not in SHELL_BLOCKS:
            continue
        if lang == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            start = n
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
        else:
            if pending.strip():
                yield start, pending.strip()
            pending = ""


def megaswift_argvs(command: str):
    """The argument lists given to megaswift in one shell command line (`&&` chains, `;`, pipes):
    `megaswift ...`, `.venv/bin/megaswift ...`, `python -m megaswift ...`, `torchrun ... -m megaswift ...`."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segment: list[str] = []
    for token in [*lexer, ";"]:
        if token not in OPERATORS:
            segment.append(token)
            continue
        words = [w for i, w in enumerate(segment) if w not in REDIRECTS and (i == 0 or segment[i - 1] not in REDIRECTS)]
        while words and re.match(r"\w+=", words[0]):  # VAR=value before the program
            words.pop(0)
        if words and Path(words[0]).name == "megaswift":
            yield words[1:]
        elif "-m" in words and words[words.index("-m") + 1:][:1] == ["megaswift"]:
            yield words[words.index("-m") + 2:]
        segment = []


def parse_problem(argv: list[str]) -> str | None:
    """Why megaswift's parser refuses `argv` (None when it accepts it), following launch/slurm's
    subcommand after `--`."""
    argv = [re.sub(r"\$\{?\w+\}?", "1", a) for a in argv]
    if "--config" in argv[:-1] and argv[0] not in ("launch", "slurm"):
        i = argv.index("--config")
        if not argv[i + 1].startswith("configs/"):  # a placeholder such as my.yaml: check the rest
            argv = argv[:i] + argv[i + 2:]
        elif (ROOT / argv[i + 1]).is_file():
            argv[i + 1] = str(ROOT / argv[i + 1])
        else:
            return f"--config {argv[i + 1]}: no such file in the repository"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns, _ = parse(argv)
    except SystemExit:  # argparse's error, on stderr
        return (err.getvalue().strip().splitlines() or ["argparse refused it"])[-1]
    except MegaswiftError as e:
        return str(e)
    if ns.command in ("launch", "slurm"):
        return parse_problem(ns.sub_argv)
    return None


def doc_commands():
    for path in DOCS:
        for n, command in shell_commands(path.read_text()):
            for argv in megaswift_argvs(command):
                yield pytest.param(path, n, command, argv, id=f"{rel(path)}:{n}")


@pytest.mark.parametrize("path,line,command,argv", list(doc_commands()))
def test_command_parses(path, line, command, argv):
    problem = parse_problem(argv)
    assert problem is None, f"{rel(path)}:{line}: `{command}` does not parse: {problem}"


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_links_resolve(path):
    bad = []
    for n, line in prose_lines(path.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "``", line)):  # not inside `code`
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, fragment = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{rel(path)}:{n}: link to {target}: {file} does not exist")
            elif fragment and dest.suffix == ".md" and fragment not in set(anchors(dest)):
                bad.append(f"{rel(path)}:{n}: link to {target}: no heading #{fragment} in {rel(dest)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_named_files_exist(path):
    bad = [f"{rel(path)}:{n}: {p} does not exist"
           for n, line in enumerate(path.read_text().splitlines(), 1)
           for p in REPO_PATH.findall(line) if not (ROOT / p).exists()]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_a_bad_command():
    doc = "text\n```bash\nmegaswift launch --nproc-per-node 2 -- \\\n    train sft --parallel.tpp 2   # typo\n```\n"
    [(line, command)] = shell_commands(doc)
    [argv] = megaswift_argvs(command)
    assert line == 3 and "unknown config key 'parallel.tpp'" in parse_problem(argv)
    assert "invalid choice" in parse_problem(["train", "sftt"])
    assert "no such file" in parse_problem(["train", "sft", "--config", "configs/missing.yaml"])
    assert [a[:2] for a in megaswift_argvs("torchrun --nproc-per-node 2 -m megaswift verify X > log; ls")] == [
        ["verify", "X"]]
    assert parse_problem(["launch", "--nproc-per-node", "$N", "--", "export-hf", "CKPT", "HF_DIR"]) is None
