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


def test_auto_amp_is_bf16_on_cpus_with_avx512_bf16_and_no_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    expected = "bf16" if torch.backends.mkldnn.is_available() else "none"
    assert resolve_amp("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_amp("auto", torch.device("cpu")) == "none"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_amp("auto", torch.device("cpu")) == expected
