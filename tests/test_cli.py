"""The command line's own checks (ride_fast.cli): flags read by argparse name themselves in their
messages, errors of the operating system name the path, and a reader that closes the pipe early
ends the command quietly."""
import subprocess
import sys
from pathlib import Path

import pytest

from ride_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("epochs", ["0", "-1", "x"])
def test_demo_refuses_an_epoch_count_below_one(tmp_path, capsys, epochs):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--out-dir", str(tmp_path / "demo"), "--epochs", epochs])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "ride-fast demo: error: argument --epochs: " in err
    assert ("expected a whole number, got 'x'" if epochs == "x" else f"must be >= 1, got {epochs}") in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--ride-experts", "2,x", "argument --ride-experts: item 2 of '2,x': expected a whole number, got 'x'"),
    ("--ride-experts", "0,2", "argument --ride-experts: item 1 of '0,2': must be >= 1, got 0"),
    ("--thresholds", "0.5,abc", "argument --thresholds: item 2 of '0.5,abc': expected a number, got 'abc'"),
])
def test_ensemble_lists_name_the_flag_and_the_item(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exited:
        main(["analyze", "ensemble", flag, value, "--out-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert f"ride-fast analyze ensemble: error: {message}" in capsys.readouterr().err


def test_ensemble_lists_parse():
    from ride_fast.cli import build_parser

    args = build_parser().parse_args(["analyze", "ensemble", "--ride-experts", "2, 3", "--thresholds", "0.5,1"])
    assert args.ride_experts == [2, 3] and args.thresholds == [0.5, 1.0]
    args = build_parser().parse_args(["analyze", "ensemble"])
    assert args.ride_experts == [] and args.thresholds == []


def test_an_error_of_the_operating_system_names_the_path_without_a_traceback(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    out_dir = tmp_path / "a_file" / "run"
    assert main(["train", f"train.out_dir={out_dir}", "train.epochs=1", "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err == f"ride-fast train: error: cannot open {out_dir}: Not a directory\n"


def test_a_closed_pipe_ends_the_command_quietly():
    """`ride-fast show-config | head -1`: the reader goes away before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "ride_fast", "show-config"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1
    assert err == ""
