"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here: the GPU-readiness check a CPU
machine can run (tests/kernels/test_sm90_compile.py, bench/aot_check.py).

``compile_variant`` compiles one kernel variant (its constexpr features and one tile configuration) for a target
such as sm_90 and reports what a GPU run would get: registers, stack (spilled registers), shared memory, whether
the dots became wgmma (Hopper's asynchronous MMA) or mma, and whether operands are loaded asynchronously (cp.async
or the bulk tensor copy). Must run without ``TRITON_INTERPRET`` (an interpreted kernel does not compile).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Per-channel vectors, partial sums and workspaces are fp32 whatever the activations' dtype.
_FP32_POINTERS = ("scale", "shift", "mean", "m2", "sum", "alpha", "beta", "gamma", "rstd", "bias", "ws", "prev_s",
                  "prev_t")
_TRITON_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def signature(fn, constexprs: Dict[str, object], dtype: str) -> Dict[str, str]:
    """Triton's argument signature of kernel ``fn`` for activations of ``dtype`` ("bfloat16", ...)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "tile_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if any(k in name for k in _FP32_POINTERS) else f"*{_TRITON_DTYPES[dtype]}"
        else:
            sig[name] = "i32"
    return sig


def _resources(cubin: bytes) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, read by the cuobjdump that Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def specialized(fn, ints: Dict[str, int]) -> List[str]:
    """The integer arguments a launch with these values specialises as divisible by 16 (Triton does so for every
    integer argument not in the kernel's do_not_specialize list): they change the generated code (masks, vector
    widths, register use), so a compile meant to match a launch must say so."""
    dns = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    return sorted(n for n, v in ints.items() if n not in dns and v % 16 == 0)


def compile_variant(fn, constexprs: Dict[str, object], dtype: str, num_warps: int, num_stages: int,
                    arch: int = 90, divisible: Sequence[str] = ()) -> Dict[str, Optional[object]]:
    """Compile one variant for sm_<arch>, pointers 16-byte aligned and the ``divisible`` integer arguments
    divisible by 16 (as a launch specialises them): {"ok", "error", "regs", "spill_bytes", "smem_bytes", "mma",
    "async_copy", "pipelined", "mma_overlap"}; spill_bytes is the stack frame the registers spilled to (STACK +
    LOCAL)."""
    row: Dict[str, Optional[object]] = {"ok": False, "error": None, "regs": None, "spill_bytes": None,
                                        "smem_bytes": None, "mma": None, "async_copy": None, "pipelined": None,
                                        "mma_overlap": None}
    try:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in constexprs and (n.endswith("_ptr") or n in divisible)}
        compiled = triton.compile(ASTSource(fn, signature(fn, constexprs, dtype), constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # a compile failure is a result, reported per variant
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:1500]}"
        return row
    ptx = compiled.asm["ptx"]
    res = _resources(compiled.asm["cubin"])
    row.update(ok=True, regs=res.get("REG"), spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
               smem_bytes=compiled.metadata.shared,
               mma="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None,
               async_copy="cp.async" in ptx or "cp.async.bulk.tensor" in ptx,
               pipelined=pipelined(compiled.asm["ttgir"]), mma_overlap=mma_overlap(compiled.asm["ttgir"]))
    return row


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
