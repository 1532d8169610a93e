"""Where a run computes: "auto" precision per device (ride_fast.engine.runtime)."""
import os
import platform
import sys

import pytest
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


# A training step's pattern on the host: ~70 MB of activations in blocks of a few MB, all freed at its
# end. The blocks come from glibc's malloc, as torch's CPU tensors do, but without the interpreter's
# and torch's small allocations between them, which make the heap's layout differ from run to run.
_STEPS_OF_ALLOCATIONS = """
import ctypes, resource, sys
from ride_fast.engine import runtime
kept = runtime.keep_host_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def step():
    blocks = [libc.malloc(6 << 20) for _ in range(12)]
    for block in blocks:
        ctypes.memset(block, 1, 6 << 20)
    for block in blocks:
        libc.free(block)

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _faults_per_step(mode: str) -> tuple[str, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _STEPS_OF_ALLOCATIONS, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))})
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's heap settings")
def test_keep_host_memory_stops_the_page_faults_of_each_step():
    kept, faults = _faults_per_step("keep")
    assert kept == "True"
    _, default_faults = _faults_per_step("default")
    assert faults < 100, f"{faults} page faults per step with the heap kept (72 MB of fresh pages are about 18,000)"
    assert default_faults > 10_000, f"glibc's default trimming faulted {default_faults} pages per step"


def test_keep_host_memory_leaves_a_tuned_allocator_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime_module.ctypes, "CDLL", lambda *a, **k: calls.append(a))
    for key, value in (("MALLOC_TRIM_THRESHOLD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")):
        with monkeypatch.context() as m:
            m.setenv(key, value)
            assert runtime_module._set_glibc_heap_thresholds() is False
    assert calls == []


def test_a_cpu_train_step_keeps_host_memory(monkeypatch):
    from torch import nn

    from ride_fast.engine.step import TrainStep

    calls = []
    monkeypatch.setattr("ride_fast.engine.step.keep_host_memory", lambda: calls.append(1) or True)
    net = nn.Linear(2, 2)
    TrainStep(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), device=torch.device("cpu"))
    assert calls == [1]


def test_every_engine_entry_on_the_cpu_keeps_host_memory(monkeypatch):
    from ride_fast.engine import resolve_device

    calls = []
    monkeypatch.setattr(runtime_module, "keep_host_memory", lambda: calls.append(1) or True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert calls == [1]
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu") and calls == [1, 1]
