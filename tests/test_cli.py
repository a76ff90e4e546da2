"""The command line: a dozen named options per command, every other training setting through
`--set key=value`, and one message form for a bad choice wherever it was written."""
from __future__ import annotations

import re

import pytest
import typer

from conftest import invoke, one_line, runner, snapshot
from kaggle_vit.cli import app
from kaggle_vit.config import load_toml
from kaggle_vit.spec import bundled_dir

AUG_CHOICES = "must be one of rotate, affine, flip, crop, none"


def _options(command: str) -> list[str]:
    """The options `kaggle-vit COMMAND --help` lists (--help itself included), from its help text."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return re.findall(r"^\W*(--[a-z][a-z-]*)", result.output, flags=re.MULTILINE)


def test_cv_help_lists_at_most_sixteen_options():
    options = _options("cv")
    assert "--help" in options and len(options) == len(set(options)) <= 16, options
    assert {"--competition", "--folds", "--fold", "--model", "--preset", "--config", "--set", "--epochs",
            "--time-budget", "--jobs", "--nproc", "--quiet"} <= set(options)
    command = typer.main.get_command(app).commands["cv"]
    assert len(command.get_params(command.make_context("cv", []))) == len(options)  # the help text hides none


@pytest.mark.parametrize("command", ["tune", "bench", "submit"])
def test_other_commands_stay_near_a_dozen_options(command):
    options = _options(command)
    assert len(options) <= 16, options
    assert ("--set" in options) == (command != "submit")


def test_submit_and_cv_both_choose_folds_with_fold():
    assert "--fold" in _options("submit") and "--folds" not in _options("submit")


def test_set_writes_any_setting_into_the_run_and_named_options_win(comp, tiny, tmp_path, monkeypatch):
    result = invoke(["cv", "--config", tiny, "--data-dir", comp, "--fold", "1", "--run-dir", tmp_path / "run", "--quiet",
                     "--set", "aug=flip", "--set", "seed=7", "--set", "lr=1e-3", "--set", "tta=1",
                     "--set", "epochs=5", "--epochs", "1"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    saved = load_toml(tmp_path / "run" / "config.toml")
    assert (saved["aug"], saved["seed"], saved["lr"], saved["tta"], saved["epochs"]) == ("flip", 7, 0.001, 1, 1)


@pytest.mark.parametrize("command", ["cv", "tune", "bench"])
@pytest.mark.parametrize("item, message", [
    ("augg=flip", "error: --set: unknown key 'augg'; did you mean 'aug'?"),
    ("lr=fast", "error: --set: lr = 'fast' must be a number"),
    ("epochs=2.5", "error: --set: epochs = '2.5' must be a whole number"),
    ("compile=yes", "error: --set: compile = 'yes' must be true or false"),
    ("aug=spin", f"error: --set: aug = 'spin' {AUG_CHOICES}"),
    ("aug", "error: --set aug: give key=value, e.g. --set aug=flip"),
])
def test_a_bad_set_is_one_line_before_any_data_is_read(tmp_path, monkeypatch, command, item, message):
    before = snapshot(tmp_path)
    result = invoke([command, "--data-dir", tmp_path / "no-data", "--set", item], tmp_path, monkeypatch)
    assert result.exit_code == 2 and one_line(result) == message
    assert snapshot(tmp_path) == before and not (tmp_path / "no-data").exists()


def test_a_bad_choice_reads_the_same_in_a_spec_a_config_file_and_set(tmp_path, monkeypatch):
    spec = tmp_path / "spec.toml"
    spec.write_text((bundled_dir() / "digit-recognizer.toml").read_text() + '\n[train]\naug = "spin"\n')
    config = tmp_path / "run.toml"
    config.write_text('epochs = 1\naug = "spin"\n')
    for args, where in ((["-c", spec], f"{spec} [train]"), (["--config", config], str(config)),
                        (["--set", "aug=spin"], "--set")):
        result = invoke(["cv", "--data-dir", tmp_path / "no-data", *args], tmp_path, monkeypatch)
        assert result.exit_code == 2 and one_line(result) == f"error: {where}: aug = 'spin' {AUG_CHOICES}"
