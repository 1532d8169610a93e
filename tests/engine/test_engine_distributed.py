"""Data-parallel training through torchrun + DDP + gloo on the CPU.

The equivalence test: 2 ranks with the same global batch follow 1 process's trajectory. It holds
with this configuration, and the test says so:
  - train.sync_bn=true: BatchNorm statistics over the global batch (GlobalBatchNorm2d on gloo);
  - data.augment=false: augmentation draws are per rank (the images per step are the same);
  - loss.reweight_epoch=1: the second epoch is in the DRW phase, where the classification term is a
    class-weighted mean; each rank divides by its share of the global batch's weight sum (not by its
    own), so the ranks' terms add up to the global weighted mean;
  - float64 (tests/_ride_fast_f64.py): in float32 merely permuting a batch of these MNIST digits moves
    the first gradient by a few percent at initialisation, which would drown the comparison.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ride_fast.engine.distributed import DistContext, GlobalBatchNorm2d, convert_sync_batchnorm, init_distributed, wrap_ddp
from ride_fast.models import create_model

HERE = Path(__file__).resolve().parents[1]  # tests/
F64 = str(HERE / "_ride_fast_f64.py")
RUN = ["data.test_per_class=10", "data.batch_size=32", "data.eval_batch_size=64", "train.max_steps_per_epoch=4", "train.epochs=2",
       "train.progress=false", "model.num_experts=2", "loss.reweight_epoch=1", "optim.warmup_epochs=0", "data.augment=false",
       "train.amp=none"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _train(out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launch, F64, "train", *RUN, f"train.out_dir={out}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _max_diff(a: dict, b: dict, params_only: bool = True) -> float:
    keys = [k for k in a if a[k].is_floating_point() and not (params_only and "running" in k)]
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _train(out, "train.sync_bn=true")
    return out


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(one_process, tmp_path):
    proc = _train(tmp_path, "train.sync_bn=true", nproc=2)
    assert proc.stdout.count("epoch   2") == 1  # rank 0 logs, rank 1 does not
    one, two = _weights(one_process / "last.pt"), _weights(tmp_path / "last.pt")
    assert _max_diff(one, two) < 1e-9  # weights after 8 steps (observed: 3e-12)
    assert _max_diff(one, two, params_only=False) < 1e-6  # BatchNorm running statistics too
    rec1 = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    rec2 = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rec1] == pytest.approx([r["loss"] for r in rec2], rel=1e-6)  # summed over ranks (float32 sums)
    assert [r["test"] for r in rec1] == [r["test"] for r in rec2]  # each rank evaluates its shard, counts summed
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]


def test_without_sync_bn_the_ranks_batch_statistics_differ(one_process, tmp_path):
    """The control: per-rank BatchNorm statistics (the default) move the weights measurably."""
    _train(tmp_path, nproc=2)
    assert _max_diff(_weights(one_process / "last.pt"), _weights(tmp_path / "last.pt")) > 1e-5


def test_global_batch_must_divide_over_the_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", F64, "train", *RUN,
           "data.batch_size=31", f"train.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode != 0
    assert "data.batch_size=31 is the global batch: it must be divisible by the 2 ranks" in proc.stderr


# ---------------------------------------------------------------------------- pieces, in-process spawn
def _global_bn_worker(rank: int, world: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, 4, 5, 5, generator=gen, dtype=torch.float64)
        w = torch.randn(8, 4, 5, 5, generator=gen, dtype=torch.float64)
        ref = nn.BatchNorm2d(4).double()
        ref.weight.data.uniform_(0.5, 1.5, generator=gen)
        ref.bias.data.uniform_(-1, 1, generator=gen)
        bn = GlobalBatchNorm2d(4).double()
        bn.load_state_dict(ref.state_dict())
        xr = x.clone().requires_grad_()
        ref_out = ref(xr)
        (ref_out * w).sum().backward()
        part = slice(4 * rank, 4 * rank + 4)
        xl = x[part].clone().contiguous(memory_format=torch.channels_last).requires_grad_()
        y = bn(xl)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref_out[part].detach(), rtol=0, atol=1e-12)
        (y * w[part]).sum().backward()
        for p in bn.parameters():
            dist.all_reduce(p.grad)
        torch.testing.assert_close(xl.grad, xr.grad[part], rtol=0, atol=1e-12)
        torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=1e-12)
        bn.eval()
        torch.testing.assert_close(bn(x), ref.eval()(x), rtol=0, atol=1e-12)  # evaluation: running statistics
    finally:
        # both ranks leave together, so that neither tears down its gloo pairs while the other may
        # still use them (seen once as an abort at exit: "terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    # Every check passed. Leave without the interpreter's teardown: torch's static destructors can
    # still abort the process there ("terminate called without an active exception", SIGABRT) after
    # the test has succeeded; a failed check above raises before this line and is reported as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_global_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    mp.spawn(_global_bn_worker, args=(2, f"file://{tmp_path / 'rdzv'}"), nprocs=2)


def _rng_resume_worker(rank: int, world: int, port: int, out: str) -> None:
    """A Trainer on each of `world` gloo ranks: train an epoch with per-rank streams, then resume.
    The draws are gathered before any check, so a failed check cannot leave the other rank waiting."""
    import numpy as np

    from ride_fast.config import load_config
    from ride_fast.engine import Trainer

    os.environ.update(TORCHELASTIC_RUN_ID="rng", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    overrides = ["data.test_per_class=2", "data.batch_size=8", "data.eval_batch_size=32", "train.max_steps_per_epoch=1",
                 "train.progress=false", "model.num_experts=2", "train.amp=none", "train.handle_signals=false",
                 f"train.out_dir={out}"]
    try:
        first = Trainer(load_config(overrides=[*overrides, "train.epochs=1"]), log=lambda s: None)
        torch.manual_seed(1000 + rank)  # the ranks' streams differ, as they may after a run's own draws
        np.random.seed(1000 + rank)
        first.fit()
        expected = torch.rand(4), np.random.rand(2)  # what each rank draws next, had the run gone on
        resumed = Trainer(load_config(overrides=[*overrides, "train.epochs=2"]), log=lambda s: None)
        resumed.resume(Path(out) / "last.pt")
        drawn = torch.rand(4), np.random.rand(2)
        draws = [None] * world
        dist.all_gather_object(draws, (expected, drawn))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    for r, (want, got) in enumerate(draws):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, msg=f"rank {r}: torch stream after the resume")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"rank {r}: numpy stream after the resume")
    assert not torch.equal(draws[0][0][0], draws[1][0][0])  # the ranks' streams are distinct
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as in _global_bn_worker: no interpreter teardown after the checks passed


def test_each_rank_resumes_its_own_random_streams(tmp_path):
    """Rank 0 writes the checkpoint, and it holds every rank's generators: after a resume each rank
    draws what it would have drawn without the interruption, not rank 0's numbers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_rng_resume_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False)
    try:
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=5):
            assert time.monotonic() < deadline, "the 2 ranks did not finish in 300 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    rng = torch.load(tmp_path / "last.pt", weights_only=True)["rng"]
    assert len(rng["ranks"]) == 2 and torch.equal(rng["torch"], rng["ranks"][0]["torch"])


def test_convert_sync_batchnorm_keeps_the_state_dict():
    model = create_model("resnet32", num_classes=10, num_experts=2, batched=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, GlobalBatchNorm2d) for m in bns)
    assert all(torch.equal(state[k], v) for k, v in converted.state_dict().items())
    plain = create_model("resnet32", num_classes=10, num_experts=2, batched=True)
    plain.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # outside a process group (and in evaluation) it is an ordinary BatchNorm
        torch.testing.assert_close(converted.eval()(x).logits, plain.eval()(x).logits)
        torch.testing.assert_close(converted.train()(x).logits, plain.train()(x).logits)


def test_single_process_needs_no_process_group():
    assert "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1
    ctx, device = init_distributed(torch.device("cpu"))
    assert ctx == DistContext() and not ctx.enabled and ctx.is_main and device == torch.device("cpu")
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, ctx, device) is model


def test_torchrun_with_one_process_joins_a_process_group(monkeypatch):
    """`torchrun --nproc_per_node=1` (WORLD_SIZE=1, TORCHELASTIC_RUN_ID set) trains through DDP and
    a process group (NCCL on a GPU) like a job of N processes, not as a plain single process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"TORCHELASTIC_RUN_ID": "one", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    ctx, device = init_distributed(torch.device("cpu"))
    try:
        assert ctx.enabled and ctx.world_size == 1 and ctx.is_main and dist.is_initialized()
        assert dist.get_backend() == "gloo"
        from torch.nn.parallel import DistributedDataParallel

        assert isinstance(wrap_ddp(nn.Linear(2, 2), ctx, device), DistributedDataParallel)
    finally:
        dist.destroy_process_group()
