"""The README's torchrun lines, run as written (tiny model and data, 2 gloo processes on the CPU):

  - the single-node line with `--max-restarts` and `--resume auto`: one rank is killed with SIGKILL
    in the middle of epoch 2, torchrun restarts the group, which resumes from the end of epoch 1 and
    finishes with the weights of the uninterrupted run, bit for bit; killed in epoch 1 (no checkpoint
    yet), the restarted group starts the run anew in its folder, to the same weights;
  - the multi-node line (`--nnodes=2`, c10d rendezvous), as two launchers on 127.0.0.1 with one
    process each: the same weights as one launcher with two processes.

The lines are read from README.md, so the commands documented and the commands tested cannot
drift apart; only sizes (processes per node, the config's overrides), paths and addresses change.
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ride_fast.engine.distributed import init_distributed
from ride_fast.engine.monitor import SIGNAL_AT_ENV, signal_at_from_env

from test_engine_fault_tolerance import _epochs_logged, assert_identical, state_of

README = Path(__file__).resolve().parents[2] / "README.md"
# in place of the recipe and data.root: 2 epochs of 6 steps of the built-in MNIST-LT data
TINY = ["data.test_per_class=10", "data.batch_size=16", "data.eval_batch_size=64", "train.max_steps_per_epoch=6",
        "train.epochs=2", "train.progress=false", "model.num_experts=2", "train.log_interval=2"]
KILL = "2:3:SIGKILL:1"  # rank 1 kills itself after step 3 of epoch 2 (engine/monitor.py), in the first attempt only


def readme_torchrun_lines() -> list[list[str]]:
    """Every `torchrun` command in README.md's code blocks (with the VARIABLE=value settings before
    it), continuation lines joined, as argv."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(command) if "torchrun " in command else []
            if "torchrun" in argv and all("=" in a for a in argv[:argv.index("torchrun")]):
                commands.append(argv)
    return commands


def _line(*, nodes: int) -> list[str]:
    lines = [c for c in readme_torchrun_lines() if (f"--nnodes={nodes}" in c if nodes > 1 else not any("--nnodes" in a for a in c))]
    assert len(lines) == 1, f"README.md should give one torchrun line for {nodes} node(s), found {lines}"
    return lines[0]


def _adapt(line: list[str], out: Path, nproc: int, **env_values: str) -> tuple[list[str], dict]:
    """(argv, environment settings) of the README's command with this test's sizes, paths and
    addresses: `torchrun` as `python -m torch.distributed.run`, --nproc_per_node=nproc, $VARIABLES
    from env_values, and the recipe and data.root (the arguments after `train` that are not flags)
    replaced by TINY."""
    settings = dict(a.split("=", 1) for a in line[:line.index("torchrun")])
    argv = line[line.index("torchrun"):]
    assert "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 3] == ["ride_fast", "train"]
    split = argv.index("-m") + 3
    launcher, train = argv[1:split], argv[split:]
    launcher = [f"--nproc_per_node={nproc}" if a.startswith("--nproc_per_node=") else a for a in launcher]
    for name, value in env_values.items():
        launcher = [a.replace(f"${name}", value) for a in launcher]
    assert not any("$" in a for a in launcher), launcher
    flags = []  # train's own flags (--resume auto); --config and the overrides give way to TINY
    i = 0
    while i < len(train):
        if train[i] == "--config":
            i += 2
        elif train[i].startswith("--"):
            flags += train[i:i + 2]
            i += 2
        else:
            i += 1
    return [sys.executable, "-m", "torch.distributed.run", *launcher, *TINY, f"train.out_dir={out}", *flags], settings


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT", SIGNAL_AT_ENV):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(command: tuple[list[str], dict], **env: str) -> subprocess.Popen:
    argv, settings = command
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**settings, **env))


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    """Stop a launcher that hangs: SIGTERM makes torchrun stop its workers (they run in sessions of
    their own), SIGKILL if it has not exited a minute later."""
    proc.terminate()
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc)
        pytest.fail(f"torchrun did not finish in 300 s:\n{out[-2000:]}{err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out + err


def test_readme_gives_a_restarting_single_node_line_and_a_multi_node_line():
    single, multi = _line(nodes=1), _line(nodes=2)
    for line in (single, multi):
        argv = line[line.index("torchrun"):]
        assert any(a.startswith("--max-restarts=") and int(a.split("=")[1]) >= 1 for a in argv)
        assert argv[-2:] == ["--resume", "auto"]
    assert "--rdzv-backend=c10d" in multi and "--rdzv-endpoint=$HEAD_NODE:29500" in multi


def test_the_kill_hook_names_one_rank_and_fires_in_the_first_attempt_only(monkeypatch):
    monkeypatch.setenv(SIGNAL_AT_ENV, KILL)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert signal_at_from_env() == (2, 3, signal.SIGKILL)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert signal_at_from_env() is None  # the restarted group runs to the end
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("RANK", "0")
    assert signal_at_from_env() is None  # another rank
    monkeypatch.setenv(SIGNAL_AT_ENV, "2:3:SIGKILL")
    assert signal_at_from_env() == (2, 3, signal.SIGKILL)  # no rank named: every rank


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(_run(_adapt(_line(nodes=1), out, nproc=2)))
    assert _epochs_logged(out) == [1, 2]
    return state_of(out / "last.pt")


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_restarts_the_group_which_resumes_to_the_same_weights(uninterrupted, tmp_path):
    log = _finish(_run(_adapt(_line(nodes=1), tmp_path, nproc=2), **{SIGNAL_AT_ENV: KILL}))
    assert "SIGKILL after epoch 2 step 3" in log  # rank 1 died in epoch 2 ...
    assert log.count("SIGKILL after epoch") == 1  # ... once: the restarted group did not kill itself again
    assert "resumed from" in log and "the end of epoch 1" in log  # the second attempt continued the first
    assert _epochs_logged(tmp_path) == [1, 2]  # epoch 1 once, epoch 2 once (after the restart)
    assert_identical(uninterrupted, state_of(tmp_path / "last.pt"))


@pytest.mark.slow
def test_a_rank_killed_before_the_first_checkpoint_restarts_the_run_anew_to_the_same_weights(uninterrupted, tmp_path):
    log = _finish(_run(_adapt(_line(nodes=1), tmp_path, nproc=2), **{SIGNAL_AT_ENV: "1:3:SIGKILL:1"}))
    assert "SIGKILL after epoch 1 step 3" in log  # the first attempt left config.yaml, train.log, tensorboard/: no last.pt
    assert "holds a run that stopped before its first checkpoint" in log  # the second attempt took the folder over
    assert _epochs_logged(tmp_path) == [1, 2]
    assert "stopped before its first checkpoint" in (tmp_path / "train.log").read_text()
    assert_identical(uninterrupted, state_of(tmp_path / "last.pt"))


@pytest.mark.slow
def test_two_launchers_on_two_nodes_train_as_one_launcher_with_two_processes(uninterrupted, tmp_path):
    line = _line(nodes=2)
    endpoint = f"127.0.0.1:{_free_port()}"  # the head node's address and a free port for the rendezvous
    line = [a.replace("$HEAD_NODE:29500", endpoint) for a in line]
    launchers = [_run(_adapt(line, tmp_path, nproc=1, NODE_RANK=str(node))) for node in range(2)]
    try:
        logs = [_finish(p) for p in launchers]
    finally:  # one launcher failing leaves the other waiting for its rendezvous partner
        for p in launchers:
            if p.poll() is None:
                _stop(p)
    assert sum("epoch   2" in log for log in logs) == 1  # one rank 0 over both launchers logs
    assert _epochs_logged(tmp_path) == [1, 2]
    assert_identical(uninterrupted, state_of(tmp_path / "last.pt"))


def test_a_restarted_rank_that_cannot_connect_names_the_shared_store_and_the_setting(monkeypatch):
    def refused(*args, **kwargs):
        raise RuntimeError("Gloo connectFullMesh failed with ... Connection refused\nmore")

    monkeypatch.setattr(dist, "init_process_group", refused)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "1",
                       "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=r"rank 1, restart 1: the process group could not connect \(Gloo connectFullMesh "
                                           r"failed with \.\.\. Connection refused\)\. .* TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        init_distributed(torch.device("cpu"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first attempt: torch's own error, untouched
    with pytest.raises(RuntimeError, match=r"^Gloo connectFullMesh failed"):
        init_distributed(torch.device("cpu"))
