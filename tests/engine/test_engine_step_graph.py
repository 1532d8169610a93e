"""train.cuda_graphs: the whole training step captured as one graph and replayed per batch.

On the CPU the capture is played by `_graph_emulator.RecordingBackend`, which records the step's
ATen calls and replays them on the same tensors without running the step's Python, as a CUDA graph
does. A step that a replay gets wrong (a Python value frozen at capture, state replaced instead of
written in place, a stale graph) then trains differently from the eager step, bit for bit.
The `gpu` tests run the same checks with real CUDA graphs.

Shape legend: B images, E experts, C classes.
"""
import numpy as np
import pytest
import torch
from _graph_emulator import HostReadInCapture, RecordingBackend
from test_engine_step import TinyRIDE

from ride_fast.config import LossConfig, OptimConfig
from ride_fast.engine import Trainer, TrainStep, build_optimizer
from ride_fast.engine.step_graph import StepGraphs
from ride_fast.losses import build_loss

COUNTS = np.array([9, 5, 4, 3, 2])


@pytest.fixture(autouse=True)
def no_cpu_only_host_reads(monkeypatch):
    """The loss operator's backward reads grad_output on the host when the tensors are on the CPU
    (to hand its gradient over without a multiply); on a device it never does. The stand-in
    capture runs on the CPU, so both runs here take the device's path."""
    import importlib

    monkeypatch.setattr(importlib.import_module("ride_fast.ops.ride_loss"), "_eager", lambda t: False)


def _state(step: TrainStep) -> dict:
    out = {f"param.{n}": p.detach().clone() for n, p in step.model.named_parameters()}
    out.update({f"buffer.{n}": b.clone() for n, b in step.model.named_buffers()})
    out.update({f"momentum.{i}": step.optimizer.state[p]["momentum_buffer"].clone()
                for i, p in enumerate(step.model.parameters())})
    out.update({f"metric.{k}": torch.tensor(v) for k, v in step.read_metrics().items()})
    return out


def _batches(seed=1, B=8, short=5, steps=5, device="cpu"):
    """One epoch's batches: `steps` of B images, a short last one, and one poisoned (NaN) image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps + 1):
        n = short if i == steps else B
        x = torch.randn(n, 3, 8, 8, generator=g)
        if i == steps - 1:
            x[0, 0, 0, 0] = float("nan")  # a non-finite loss: the step is skipped on the device
        out.append((x.to(device), torch.randint(0, 5, (n,), generator=g).to(device)))
    return out


def _train(backend, accumulate=1, epochs=4, reload_at=None, device="cpu", amp="none"):
    """A few epochs of TinyRIDE + RIDE loss (DRW switch after epoch 2), the lr schedule and the
    metric resets of the trainer; the eager step when backend is None."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = TinyRIDE().to(device)
    crit = build_loss(LossConfig(reweight_epoch=2), COUNTS).to(device)
    opt = build_optimizer(model, OptimConfig(), device)
    step = TrainStep(model, crit, opt, device=device, amp=amp, cuda_graphs=backend is not None,
                     graph_backend=backend, accumulate_steps=accumulate)
    if step.graphs is not None:
        step.graphs.warmup = 1  # capture early: the short batches too
    losses, states = [], []
    for epoch in range(1, epochs + 1):
        step.set_lr(0.25 / 2 ** epoch)  # exact in float32 (the graph reads a float32 lr tensor)
        crit.set_epoch(epoch)
        step.reset_metrics()
        for i, (x, y) in enumerate(_batches(seed=epoch, device=device)):
            if reload_at == (epoch, i):  # a resume: the optimizer state is loaded into new tensors
                opt.load_state_dict(opt.state_dict())
                step.set_lr(0.25 / 2 ** epoch)
            losses.append(step(x, y).clone())
        states.append(_state(step))
    return step, torch.stack(losses), states


def _assert_same_training(a, b, tol=0.0):
    """Same losses and, after every epoch, the same weights, buffers, momentum and metric sums:
    bit for bit (tol=0), or within tol (relative and absolute)."""
    (_, losses_a, states_a), (_, losses_b, states_b) = a, b
    assert torch.equal(losses_a.isnan(), losses_b.isnan())
    torch.testing.assert_close(losses_b.nan_to_num(), losses_a.nan_to_num(), rtol=tol, atol=tol)
    for epoch, (sa, sb) in enumerate(zip(states_a, states_b), 1):
        different = [k for k in sa if not torch.allclose(sa[k].double(), sb[k].double(), rtol=tol, atol=tol)]
        assert not different, f"epoch {epoch}: {len(different)} tensors differ, e.g. {different[:4]}"


@pytest.mark.parametrize("accumulate", [1, 2])
def test_replayed_step_trains_exactly_as_the_eager_step(accumulate, caplog):
    """lr changes, the DRW switch, a skipped step, a short last batch, metric resets, micro-batches."""
    backend = RecordingBackend()
    with caplog.at_level("DEBUG", logger="ride_fast"):
        graphed = _train(backend, accumulate)
    captured = [r.getMessage() for r in caplog.records if "step captured" in r.getMessage()]
    assert [m.split(" after")[0].rsplit(" ", 1)[1] for m in captured] == ["8", "5", "8", "5"]  # full, short; per phase
    _assert_same_training(_train(None, accumulate), graphed)
    step = graphed[0]
    # two shapes x two DRW phases were captured, and most steps were replays, not eager warm-ups
    assert step.graphs.captures == 4 and len(backend.graphs) == 4
    replays = sum(g.replays for g in backend.graphs)
    assert replays == 24 - backend.warmups and backend.warmups == 4


def test_a_loaded_optimizer_state_drops_the_graphs():
    """The graphs hold the old momentum tensors: after load_state_dict they are captured anew."""
    backend = RecordingBackend()
    graphed = _train(backend, reload_at=(3, 2))
    _assert_same_training(_train(None, reload_at=(3, 2)), graphed)
    assert graphed[0].graphs.captures == 5  # the phase-1 full-batch graph twice


def test_the_check_sees_what_a_replay_freezes(monkeypatch):
    """The comparison above fails when the step keeps a Python value a replay cannot see: the lr
    as a float, the DRW phase left out of the graph key, or metric sums reset into new tensors."""
    eager = _train(None)

    def float_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    def new_tensors(self):
        for k in (*self.METRICS, "run"):
            setattr(self, k, torch.zeros_like(getattr(self, k)))
        self.seen = 0

    for name, broken in [("set_lr", float_lr), ("reset_metrics", new_tensors),
                         ("_graph_key", lambda self, images, labels: (tuple(images.shape),))]:
        with monkeypatch.context() as m:
            m.setattr(TrainStep, name, broken)
            with pytest.raises(AssertionError):
                _assert_same_training(eager, _train(RecordingBackend()))


def test_a_host_read_fails_the_capture():
    def step(images, labels):
        if images.sum() > 0:  # bool(tensor): the host waits for the device
            return images.mean()
        return images.sum()

    graphs = StepGraphs(step, RecordingBackend(), warmup=1)
    x, y = torch.ones(2, 3), torch.zeros(2, dtype=torch.long)
    graphs("k", x, y, owner=None)  # eager warm-up: fine
    with pytest.raises(HostReadInCapture, match="host"):
        graphs("k", x, y, owner=None)


def test_a_tensor_from_python_data_fails_the_capture():
    """torch.tensor(...) on a GPU copies from host memory; a replay would copy from wherever that
    memory went. new_full / scalar_tensor are fills and capture fine."""
    graphs = StepGraphs(lambda x, y: x * x.new_tensor(2.0), RecordingBackend(), warmup=1)
    x, y = torch.ones(2, 3), torch.zeros(2, dtype=torch.long)
    graphs("k", x, y, owner=None)
    with pytest.raises(HostReadInCapture, match="Python data"):
        graphs("k", x, y, owner=None)
    filled = StepGraphs(lambda x, y: x * x.new_full((), 2.0), RecordingBackend(), warmup=1)
    for _ in range(3):
        assert torch.equal(filled("k", x, y, owner=None), 2 * x)


def test_a_new_signature_frees_the_least_recently_replayed_graph():
    graphs = StepGraphs(lambda x, y: x * 2, RecordingBackend(), warmup=1, max_graphs=2)
    x, y = torch.ones(3), torch.zeros(3, dtype=torch.long)
    for key in "aabba":  # a: warm-up, capture; b: the same; a replayed
        graphs(key, x, y, owner=None)
    assert list(graphs.graphs) == ["b", "a"]
    graphs("c", x, y, owner=None)  # c's warm-up: b goes first
    assert list(graphs.graphs) == ["a"]
    assert torch.equal(graphs("c", x + 1, y, owner=None), 2 * (x + 1)) and list(graphs.graphs) == ["a", "c"]
    assert torch.equal(graphs("a", x + 2, y, owner=None), 2 * (x + 2)) and graphs.captures == 3
    # b was dropped after its warm-up: its recapture frees the least recent graph (c) first
    assert torch.equal(graphs("b", x + 3, y, owner=None), 2 * (x + 3)) and graphs.captures == 4
    assert list(graphs.graphs) == ["a", "b"]


def test_cuda_graphs_needs_cuda_and_the_fused_sgd():
    model = TinyRIDE()
    crit = build_loss(LossConfig(), COUNTS)
    with pytest.raises(ValueError, match="train.cuda_graphs=true needs a CUDA device"):
        TrainStep(model, crit, build_optimizer(model, OptimConfig(), torch.device("cpu")), device=torch.device("cpu"),
                  cuda_graphs=True)
    opt = build_optimizer(model, OptimConfig(implementation="foreach"), torch.device("cpu"))
    with pytest.raises(ValueError, match="optim.implementation=fused"):
        TrainStep(model, crit, opt, device=torch.device("cpu"), cuda_graphs=True, graph_backend=RecordingBackend())


def test_trainer_with_captured_steps_matches_the_eager_trainer(tmp_path, monkeypatch):
    """The whole Trainer (lr schedule, DRW switch, evaluation between epochs, checkpoints) with
    every step replayed from a graph after its warm-up, against train.cuda_graphs=false."""
    from test_engine_trainer import tiny_cfg

    import ride_fast.engine.trainer as trainer_module

    backends = []
    # the stand-in backend takes CUDA's place (and so lifts the CUDA-only refusal)
    monkeypatch.setattr(trainer_module, "CudaGraphBackend", lambda device: backends.append(RecordingBackend()) or backends[-1])
    overrides = ["train.epochs=3", "train.max_steps_per_epoch=6", "optim.lr=0.125", "optim.warmup_epochs=0", "optim.gamma=0.5"]
    runs = {}
    for graphs in (False, True):
        cfg = tiny_cfg(tmp_path / str(graphs), *overrides, f"train.cuda_graphs={str(graphs).lower()}")
        trainer = Trainer(cfg, log=lambda s: None)
        summary = trainer.fit()
        runs[graphs] = (summary["history"], trainer.state_dict())
    (hist_a, state_a), (hist_b, state_b) = runs[False], runs[True]
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    assert [h["test"] for h in hist_a] == [h["test"] for h in hist_b]
    for k, v in state_a["model"].items():
        assert torch.equal(v, state_b["model"][k]), k
    assert state_b["optimizer"]["param_groups"][0]["lr"] == 0.125 * 0.5  # a float in the checkpoint
    assert backends and sum(g.replays for g in backends[0].graphs) >= 6
    # the graphs go before the process group (a live graph with NCCL work would hang its destruction)
    assert trainer.step.graphs.graphs
    trainer.close()
    assert not trainer.step.graphs.graphs


def test_a_failed_capture_makes_the_earlier_stream_current_again(monkeypatch):
    """torch.cuda.graph restores the current stream only after capture_end; when capture_end fails
    (a capture invalidated by a host read, say) the capture stream would stay current. Stood in for
    on the CPU: a graph context whose exit fails the way capture_end does."""
    from ride_fast.engine import step_graph

    class FailingGraph:
        def __init__(self, graph, stream, capture_error_mode):
            self.stream = stream

        def __enter__(self):
            current[0] = self.stream

        def __exit__(self, *exc):
            raise RuntimeError("operation failed due to a previous error during capture")

    current = ["default stream"]
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FailingGraph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    backend = object.__new__(step_graph.CudaGraphBackend)  # no CUDA device to build it on
    backend.device, backend.stream = torch.device("cuda"), "capture stream"
    with pytest.raises(RuntimeError, match="during capture"):
        backend.capture(lambda: torch.zeros(()))
    assert current == ["default stream"]


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_gpu_captured_step_trains_as_the_eager_step(amp, monkeypatch):
    """Real CUDA graphs (warm-up on a side stream, capture, replay): the same checks as on the CPU,
    GradScaler included with fp16, within float rounding (cuDNN may pick other kernels in capture)."""
    from ride_fast.engine.step_graph import CudaGraphBackend

    device = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    graphed = _train(CudaGraphBackend(device), device=device, amp=amp)
    eager = _train(None, device=device, amp=amp)
    _assert_same_training(eager, graphed, tol={"none": 1e-4, "bf16": 2e-2, "fp16": 1e-2}[amp])
    assert graphed[0].graphs.captures == 4

