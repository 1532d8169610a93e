"""The README's "Using it" commands are real command lines: each parses with the CLI's parser,
its recipe and overrides load, and every `train` line (the resume one included) names the data
folder its data set needs, so that it runs as written once /data/... is a real path."""
import shlex
from pathlib import Path

import pytest

from ride_fast.cli import build_parser
from ride_fast.config import load_config

ROOT = Path(__file__).resolve().parents[1]


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
