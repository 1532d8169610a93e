"""SASS, the GPU's own instructions, of a compiled kernel: its listing (nvdisasm, bundled with
Triton beside ptxas), its loops, those that stream a row, and the spill instructions inside
them. Plain Python: importing it changes nothing (unlike `ride_fast_kernels.report`, which turns
the interpreter off to compile for real)."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


def listing(cubin: bytes, ptxas: str) -> list[str]:
    """The SASS instructions of a cubin in order (nvdisasm from ptxas's folder), each label
    (".L_x_7:") kept as an entry of its own so that loops can be found."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c", path],
                              capture_output=True, text=True, check=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line) or re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            out.append(m.group(1))
    return out


def loops(entries: list[str]) -> list[list[str]]:
    """The instructions of each loop of a `listing`, labels and NOPs left out: a loop runs from a
    label to the branch back to it."""
    labels, instr = {}, []
    for entry in entries:
        if entry.startswith(".L_x_"):
            labels[entry] = len(instr)
        else:
            instr.append(entry)
    out = []
    for j, text in enumerate(instr):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), j + 1) <= j:
            out.append([t for t in instr[labels[m.group(1)]:j + 1] if not t.startswith("NOP")])
    return out


#: a vector global access: the main loops' loads of the logits (direct, or copies into shared
#: memory with stages > 1) and stores of the gradient
VECTOR_ACCESS = re.compile(r"(LDG|STG|LDGSTS)\.E\S*\.(128|64)\b")


def main_loops(entries: list[str]) -> list[list[str]]:
    """The `loops` of a listing that stream a row: those with vector global accesses. The loop
    over a row's masked blocks (the tail and the head, once or twice a row) has scalar ones."""
    return [loop for loop in loops(entries) if any(VECTOR_ACCESS.search(t) for t in loop)]


def loop_spills(entries: list[str]) -> int:
    """Local-memory instructions (spill stores and loads, STL / LDL) inside the `main_loops` of a
    `listing`: a spill there is paid every tile, one outside them once a row."""
    return sum(bool(re.match(r"(@!?U?P\w+\s+)?(STL|LDL)\b", t)) for loop in main_loops(entries) for t in loop)
