"""README is a front door that stays true: short, no history, links that resolve, the install and test
lines CI runs, every `kaggle-vit` command accepted by the command line, and the quick start run as
written on a small competition, each command printing what README says it prints."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from kaggle_vit.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Appended to README's training commands by the quick-start test (its docstring says why).
BUDGET = {"cv": ["--epochs", "2"], "tune": ["--trials", "2", "--epochs", "1"]}
NUMBER = r"\d[\d,]*(?:\.\d+)?"
PLACEHOLDER = "MODEL-HASH"  # a run folder's name: the model and a hash of its settings


def readme() -> str:
    """README's text, read anew by each test."""
    return README.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text under README's `## title`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme(), re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def bash_lines(text: str) -> list[str]:
    """The non-empty lines of the ```bash blocks in `text`."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def table_rows(text: str) -> list[list[str]]:
    """The cells of the body rows of the one Markdown table in `text` (its header and rule left out)."""
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def code_spans(cell: str) -> list[str]:
    """The `code` in a table cell: a command, or the lines README says a command prints."""
    spans = re.findall(r"`([^`]+)`", cell)
    assert spans, f"README's quick-start table: no `code` in the cell '{cell}'"
    return spans


def printed(sample: str) -> re.Pattern:
    """README's sample of a printed line as a pattern: any number where it shows one, any run folder
    name where it shows MODEL-HASH, the rest as written."""
    parts = re.split(rf"({PLACEHOLDER}|{NUMBER})", sample)
    return re.compile("".join(r"[\w.-]+" if p == PLACEHOLDER else NUMBER if p[:1].isdigit() else re.escape(p)
                              for p in parts))


def kaggle_vit_commands() -> list[str]:
    """Every `kaggle-vit ...` command README shows, in code spans and bash blocks, split at `&&`."""
    text = readme()
    found = re.findall(r"`(kaggle-vit [^`]+)`", text) + [line for line in bash_lines(text)
                                                        if line.startswith("kaggle-vit ")]
    return [part.strip() for command in found for part in command.split("&&")]


def ci_commands(marker: str) -> list[str]:
    """The commands `.ci/run` runs under its `# README: marker` comment, up to the next comment or blank line."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# README: {marker}"))
    block = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("#"):
            break
        block.append(line.strip())
    return block


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_has_no_history():
    text = readme()
    assert len(text.splitlines()) <= 300
    assert "session" not in text.lower()
    hashes = re.findall(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", text)
    assert not hashes, f"commit hashes in README: {hashes}"


def test_relative_links_point_at_files_and_headings_that_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", readme())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert local, "README links to no file of the project"
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), re.M)
            assert anchor in {slug(h) for h in headings}, f"README links to {link}: no such heading"


def test_install_and_test_lines_are_what_ci_runs():
    lines = bash_lines(readme())
    installs = [shlex.split(line, comments=True) for line in lines if line.startswith("pip ")]
    tests = [line for line in lines if line.startswith("pytest")]
    assert installs == [shlex.split(c) for c in ci_commands("install")]
    assert [c.strip() for line in tests for c in line.split("&&")] == ci_commands("test")


def test_every_command_in_readme_is_accepted_by_the_command_line():
    """Each `kaggle-vit` command README shows parses: the command exists, and so do its options, with
    values of their type (NAME-like placeholders stand for names, which any text is)."""
    commands = kaggle_vit_commands()
    group = get_command(app)
    assert len(commands) >= 10
    refused = []
    for command in commands:
        name, *args = shlex.split(command, comments=True)[1:]
        if name not in group.commands:
            refused.append(f"`{command}`: no command '{name}'")
            continue
        try:
            group.commands[name].make_context(name, args)
        except Exception as exc:  # click's usage errors (an unknown option, a bad value), each its own class
            refused.append(f"`{command}`: {exc}")
    assert not refused, "README shows commands the command line refuses:\n" + "\n".join(refused)


@pytest.mark.slow  # it trains: cv, tune, then submit, report and score in fresh processes
def test_quick_start_runs_as_written(comp: Path):
    """README's quick start, extracted from its ```bash block under `## Quick start`, run in order in a
    fresh folder whose data/digit-recognizer already holds a real-MNIST competition in Kaggle's files
    (600 training rows, 200 test rows and the offline build's solution.csv), so `data` finds it and
    `score` has answers. Each command must exit 0 and print every line README's table quotes for it
    (numbers and run folder names aside, which depend on the data).

    What changes from README, and why: `kaggle-vit` runs as `python -m kaggle_vit.cli` with this
    tree on PYTHONPATH (the code under test, not an installed copy), and the training commands get a
    budget appended so that they train for seconds, not minutes: `cv ... --epochs 2` (two, so that the
    plan line reads "2 epochs" as README's "11 epochs" does), and `tune ... --trials 2 --epochs 1`
    (the last value of a repeated option wins). Nothing else."""
    commands = bash_lines(section("Quick start"))
    rows = table_rows(section("Quick start"))
    assert [code_spans(row[0])[0] for row in rows] == commands, "the quick-start table and block differ"
    assert [shlex.split(c)[:2] for c in commands] == [["kaggle-vit", name] for name in
                                                      ("data", "cv", "tune", "submit", "report", "score")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command, row in zip(commands, rows):
        name, *args = shlex.split(command, comments=True)[1:]
        result = subprocess.run([sys.executable, "-m", "kaggle_vit.cli", name, *args, *BUDGET.get(name, [])],
                                cwd=comp.parents[1], env=env, capture_output=True, text=True, timeout=600)
        shown = f"`{command}` printed:\n{result.stdout}\n{result.stderr}"
        assert result.returncode == 0, shown
        for sample in code_spans(row[1]):
            assert printed(sample).search(result.stdout), f"README says it prints `{sample}`; {shown}"
