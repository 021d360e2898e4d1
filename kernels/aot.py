"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here: the GPU-readiness check a CPU
machine can run (tests/kernels/test_sm90_compile.py, bench/aot_check.py).

A launch is compiled the way Triton's JIT compiles it on the GPU: ``for_target`` makes a target such as sm_90 the
JIT's current one (a driver that only names the target: nothing is loaded or launched), and the launch's own
arguments go through ``kernel.warmup`` — the JIT's argument binding and specialisation (integer arguments equal
to 1 become constants, multiples of 16 and 16-byte-aligned pointers are marked divisible by 16), then its
compile. Launches are recorded elsewhere (under the interpreter) as ``describe``'s JSON-able form and rebuilt here
with ``rebuild``: a tensor argument is its dtype and whether its address is 16-byte aligned, which is all the
specialisation reads of it.

``analyse`` reports what a GPU run would get: registers, spilled bytes (the stack frame, ``spill_bytes``), shared
memory, whether the dots became wgmma (Hopper's asynchronous MMA) or mma, whether operands are loaded
asynchronously (cp.async or the bulk tensor copy), whether the main loop is software-pipelined and whether a
wgmma stays in flight. ``spill_probe`` hands ``spill_bytes`` to ``conv.spill_probe``, so the check prunes tiles by
the rule autotuning applies on the GPU. Must run without ``TRITON_INTERPRET`` (an interpreted kernel does not
compile).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver


class _TargetDriver(DriverBase):
    """Triton's driver interface for a target with no device: what the JIT asks of a driver to bind, specialise and
    compile a launch (the current target, device and stream). Its device is a name of its own, so compiled
    kernels are cached apart from those of a GPU present in the same process."""

    def __init__(self, arch: int):
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"aot-sm_{arch}"

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("ahead-of-time compilation launches nothing")

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("ahead-of-time compilation benchmarks nothing")


@contextlib.contextmanager
def for_target(arch: int = 90):
    """Inside the block, Triton's JIT compiles for sm_<arch> (``kernel.warmup`` compiles without a GPU)."""
    saved = driver._active  # None until a driver was first asked for; asking for one raises on a CPU machine
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = saved


class LaunchTensor:
    """A tensor argument as the JIT's specialisation sees it: a dtype and an address (0: 16-byte aligned)."""

    def __init__(self, dtype: torch.dtype, aligned: bool = True):
        self.dtype = dtype
        self.aligned = aligned

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


def describe(kwargs: dict) -> dict:
    """A launch's keyword arguments in JSON: tensors as {"dtype", "aligned"}, everything else as is."""
    out = {}
    for name, v in kwargs.items():
        if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
            out[name] = {"dtype": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
        else:
            out[name] = v
    return out


def rebuild(described: dict) -> dict:
    """``describe``'s inverse, with LaunchTensor for the tensors."""
    return {name: LaunchTensor(getattr(torch, v["dtype"]), v["aligned"]) if isinstance(v, dict) else v
            for name, v in described.items()}


def compile_launch(kernel, kwargs: dict, arch: int = 90, **options):
    """The kernel Triton's JIT compiles for this launch on sm_<arch> (``options``: the tile's constexprs,
    num_warps, num_stages, as the launch passes them)."""
    with for_target(arch):
        compiled = kernel.warmup(grid=(1,), **kwargs, **options)
    return compiled.result() if hasattr(compiled, "result") else compiled


def compile_tile(kernel, kwargs: dict, tile, arch: int = 90):
    """A conv launch with one tile compiled for sm_<arch> exactly as autotuning compiles it on the GPU
    (``conv.compile_tile``: the same JIT call, so the same cache entry as ``spill_probe``'s)."""
    from . import conv

    with for_target(arch):
        return conv.compile_tile(kernel, kwargs, tile)


def specialisation(compiled) -> Dict[str, List[str]]:
    """What the JIT specialised in this compiled kernel: the integer arguments that became the constant 1
    ("equal_to_1") and the arguments marked divisible by 16 ("divisible_by_16": integers and pointers)."""
    src = compiled.src
    names = src.fn.arg_names
    declared = set(getattr(src.fn, "constexprs", ()))
    ones = [names[k[0]] for k, v in src.constants.items() if k[0] not in declared and v == 1]
    divisible = [names[k[0]] for k, attrs in src.attrs.items()
                 if any(a[0] == "tt.divisibility" and a[1] == 16 for a in attrs)]
    return {"equal_to_1": sorted(ones), "divisible_by_16": sorted(divisible)}


def _resources(cubin: bytes) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, read by the cuobjdump that Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def spill_bytes(compiled) -> int:
    """The stack frame (STACK + LOCAL) of the compiled kernel's cubin: where its registers spill. On a GPU the same
    figure is the module's local memory per thread (``conv.loaded_spill_bytes``)."""
    res = _resources(compiled.asm["cubin"])
    return res.get("STACK", 0) + res.get("LOCAL", 0)


# Shared memory one block may use (opt-in) on the compile targets: a kernel asking more fails to load there, as
# Triton's loader reports it (OutOfResources).
MAX_SHARED = {90: 227 * 1024}


def spill_probe(arch: int = 90):
    """A measurement for ``conv.spill_probe``: the launch compiled for sm_<arch>, its spill read from the cubin;
    OutOfResources where it needs more shared memory than the target has (on the GPU loading it raises that)."""
    from triton.runtime.errors import OutOfResources

    def probe(kernel, kwargs, tile):
        compiled = compile_tile(kernel, kwargs, tile, arch)
        if compiled.metadata.shared > MAX_SHARED[arch]:
            raise OutOfResources(compiled.metadata.shared, MAX_SHARED[arch], "shared memory")
        return spill_bytes(compiled)
    return probe


def analyse(compiled) -> Dict[str, Optional[object]]:
    """{"regs", "spill_bytes", "smem_bytes", "mma", "async_copy", "pipelined", "mma_overlap"} of a compiled
    kernel."""
    ptx = compiled.asm["ptx"]
    res = _resources(compiled.asm["cubin"])
    return {"regs": res.get("REG"), "spill_bytes": res.get("STACK", 0) + res.get("LOCAL", 0),
            "smem_bytes": compiled.metadata.shared,
            "mma": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None,
            "async_copy": "cp.async" in ptx or "cp.async.bulk.tensor" in ptx,
            "pipelined": pipelined(compiled.asm["ttgir"]), "mma_overlap": mma_overlap(compiled.asm["ttgir"])}


def mma_overlap(ttgir: str) -> Optional[bool]:
    """Whether an asynchronous wgmma stays in flight while the next iteration's is issued (a wait that leaves one
    pending), or None without wgmma. An operand transformed in registers and stored to shared memory every
    iteration makes the kernel wait for each MMA before overwriting it."""
    waits = [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)]
    return any(p >= 1 for p in waits) if waits else None


def dot_loop_depths(ttgir: str) -> List[int]:
    """For every MMA of the kernel (tt.dot or Hopper's warp_group_dot) in Triton's final GPU IR, how many scf.for
    loops enclose it."""
    depths, stack = [], []  # stack: one entry per open region brace, True where it is a loop's body
    for line in ttgir.splitlines():
        code = line.split(" loc(")[0]
        if "tt.dot" in code or "warp_group_dot " in code:
            depths.append(sum(stack))
        opens, closes = code.count("{"), code.count("}")
        if code.lstrip().startswith("}"):  # a region closes first, then (``} else {``) another may open
            for _ in range(min(closes, len(stack))):
                stack.pop()
            stack += [False] * opens
        else:
            net = opens - closes  # attribute dictionaries open and close on one line
            stack += [("scf.for" in code)] * max(net, 0)
            for _ in range(max(-net, 0)):
                stack.pop()
    return depths


def pipelined(ttgir: str) -> bool:
    """Whether the conv main loop is software-pipelined as one loop: every MMA sits in exactly one scf.for, and
    its operands arrive by asynchronous copies into multi-buffered shared memory (a loop nested in another loop
    drains and refills its pipeline at every outer step)."""
    multi_buffered = re.search(r"ttg\.local_alloc[^\n]*memdesc<([2-9]|\d\d+)x", ttgir) is not None
    async_loads = "async_copy_global_to_local" in ttgir or "async_tma_copy_global_to_local" in ttgir
    depths = dot_loop_depths(ttgir)
    return bool(depths) and all(d == 1 for d in depths) and multi_buffered and async_loads
