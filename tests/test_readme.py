"""The README's command lines, read as a user would copy them: each "Using it" command parses with
the CLI's parser and its recipe and overrides load; every `train` or `data check` line (torchrun
lines included, the resume ones too) names the data folder its data set needs, so that it runs as
written once /data/... is a real path."""
import re
import shlex
from pathlib import Path

import pytest

from ride_fast.cli import build_parser
from ride_fast.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent


def using_it_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("ride-fast ")]


def test_the_block_holds_the_commands():
    commands = {argv[0] for argv in using_it_commands()}
    assert {"train", "route", "eval", "data", "analyze", "show-config", "flops", "convert"} <= commands


@pytest.mark.parametrize("argv", using_it_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_each_command_parses_and_its_config_loads(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    if argv == ["--version"]:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(argv)
        assert exited.value.code == 0
        return
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None):
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            assert cfg.data.name == "mnist_lt" or cfg.data.root, f"`ride-fast {' '.join(argv)}` names no data.root for {cfg.data.name}"


def readme_commands() -> list[list[str]]:
    """Each command line of README.md's bash blocks (continuations joined, comments dropped) as argv."""
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [argv for argv in lines if argv]


def data_commands() -> list[list[str]]:
    """The `train` and `data check` lines that read a data set through a recipe: [recipe, override, ...]."""
    found = []
    for argv in readme_commands():
        rest = argv[argv.index("train") + 1:] if "train" in argv else argv[argv.index("check") + 1:] if "check" in argv else []
        if "--config" in rest:
            recipe = rest[rest.index("--config") + 1]
            overrides = [a for a in rest if "=" in a and not a.startswith("-")]
            found.append([recipe, *overrides])
    return found


def test_every_training_and_data_check_line_names_the_data_it_reads():
    commands = data_commands()
    assert any("--resume" in argv for argv in readme_commands() if "train" in argv)  # the resume lines are among them
    assert len(commands) >= 4, commands
    for recipe, *overrides in commands:
        data = load_config(ROOT / recipe, overrides).data
        assert data.name == "mnist_lt" or data.root, (
            f"README.md: `ride-fast ... --config {recipe} {' '.join(overrides)}` reads {data.name} but gives no data.root")
