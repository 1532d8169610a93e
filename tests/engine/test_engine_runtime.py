"""Where a run computes: "auto" precision per device (ride_fast.engine.runtime)."""
import torch

from ride_fast.engine import resolve_amp
from ride_fast.engine import runtime as runtime_module


def test_resolve_amp(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amp in ("none", "bf16", "fp16"):
        assert resolve_amp(amp, cpu) == amp and resolve_amp(amp, cuda) == amp
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp("auto", cpu) == "none"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", cuda) == "none"
