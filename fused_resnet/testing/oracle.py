"""The float64 oracle: comparisons of fused results against float64, shared by the tests, ``fused-resnet verify``
and the benchmarks.

The rule (flash-attention's): a fused result passes when its error against the float64 oracle is at most
``factor`` times PyTorch's own error in the same dtype, plus a small floor (:data:`tables.TOLERANCE`)::

    ‖fused − ref64‖ / ‖ref64‖  ≤  factor · ‖torch_same_dtype − ref64‖ / ‖ref64‖  +  floor
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backends.reference import scale_shift
from ..blocks import FusedStemMixin, _FusedForward
from ..convert import revert
from ..spec import BlockSpec
from ..tensors import Forward
from .tables import TOLERANCE

@dataclasses.dataclass
class Check:
    """One comparison against the float64 oracle."""

    name: str
    err_fused: float
    err_torch: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.err_fused <= self.bound  # NaN fails

    def row(self) -> str:
        return (f"{self.name:<48} {self.err_fused:10.2e} {self.err_torch:10.2e} {self.bound:10.2e}  "
                f"{'ok' if self.ok else 'FAIL'}")


TABLE_HEADER = f"{'check':<48} {'fused err':>10} {'torch err':>10} {'bound':>10}  status"


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (absolute error when ref is all zeros)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if x.shape != ref.shape:
        return float("inf")
    denom = ref.norm().item()
    err = (x - ref).norm().item()
    return err / denom if denom > 0 else err


def check(name: str, fused: torch.Tensor, fused_ref: torch.Tensor, torch_same: torch.Tensor,
          torch_ref: torch.Tensor, dtype: torch.dtype) -> Check:
    """The rule for one tensor: each low-precision result against its float64 reference."""
    factor, floor = TOLERANCE[dtype]
    e_torch = rel_error(torch_same, torch_ref)
    return Check(name, rel_error(fused, fused_ref), e_torch, factor * e_torch + floor)


def worst(name: str, checks: List[Check]) -> Check:
    """The check closest to (or furthest past) its bound, renamed ``name (which)``."""
    def margin(c: Check) -> float:
        return c.err_fused / c.bound if c.bound > 0 else float("inf")

    w = max(checks, key=lambda c: (not c.ok, margin(c)))
    return Check(f"{name} ({w.name})", w.err_fused, w.err_torch, w.bound)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator, every: bool = False) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, in place.

    Default BN initialisation (γ = 1, β = 0, mean 0, var 1) would hide any mix-up of γ, β and the statistics.
    The last BN of each residual branch gets a small γ in [0.1, 0.4] (near-identity blocks, the intent of
    zero_init_residual without zeroing gradients): a freshly initialised deep ResNet in train-mode BN otherwise
    has a chaotic gradient whose float32 error against float64 is ~1e-2 for PyTorch itself (see NUMERICS.md).
    ``every``: that BN too gets γ in [0.5, 1.5] (``fused-resnet verify --random-bn``), the harder oracle that a
    timm-style zero-initialised γ would otherwise hide."""
    last_bns = set()
    for m in model.modules():
        units = [getattr(m, f"bn{i}", None) for i in (1, 2, 3)]
        units = [u for u in units if isinstance(u, nn.modules.batchnorm._BatchNorm)]
        if hasattr(m, "downsample") and len(units) >= 2 and not every:
            last_bns.add(units[-1])

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    uniform(m.weight, *((0.1, 0.4) if m in last_bns else (0.5, 1.5)))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=torch.float64) * 0.1)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=generator, dtype=torch.float64) * 0.1)
                    uniform(m.running_var, 0.5, 1.5)
    return model


def _named_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _input(x: torch.Tensor, device, dtype, fmt) -> torch.Tensor:
    """A fresh leaf copy of x (never x itself, so gradients of different models never mix)."""
    xin = x.detach().to(device=device, dtype=dtype, copy=True)
    return xin.contiguous(memory_format=fmt) if xin.dim() == 4 else xin


class BranchTape:
    """The discrete decisions of one forward pass, in call order: every ReLU mask and every max-pool argmax.

    ReLU and max-pool are discontinuous in their gradient: where a pre-activation lies within rounding of 0 (or
    two pooled values within rounding of each other), a low-precision run and the float64 oracle can take
    different branches, and a single such *flip* moves a whole channel's gradient. Both PyTorch and a fused
    backend flip, at different elements (measured equally often, NUMERICS.md). To compare arithmetic rather than
    luck, ``compare_models`` replays the oracle with each run's own decisions, and counts as a *flip* every
    replayed decision that differs from the one float64 itself would take at that point (``flips``).
    Modes: "record" (append decisions), "replay" (consume recorded ones, count flips), "off" (plain ops)."""

    def __init__(self) -> None:
        self.mode = "off"
        self.entries: List[torch.Tensor] = []
        self.pos = 0
        self.flips = 0

    def start(self, mode: str, entries: Optional[List[torch.Tensor]] = None) -> None:
        self.mode, self.pos = mode, 0
        self.entries = [] if entries is None else entries

    def _next(self, numel: int) -> torch.Tensor:
        if self.pos >= len(self.entries) or self.entries[self.pos].numel() != numel:
            raise RuntimeError("branch-decision replay is out of step with the recorded run (different call order)")
        self.pos += 1
        return self.entries[self.pos - 1]

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "replay":
            mask = self._next(x.numel()).reshape(x.shape).to(x.device)
            self.flips += int((mask != (x > 0)).sum().item())
            return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        y = torch.relu(x)
        if self.mode == "record":
            self.entries.append((y > 0).detach())
        return y

    def record_block(self, spec: BlockSpec, gammas, betas, out: Forward) -> None:
        """Record the ReLU masks of a fused block from the op's outputs, recomputed exactly as the reference
        backward recomputes them (pre = a·s + t in the accumulator dtype; the last mask is y > 0)."""
        if self.mode != "record":
            return
        for i in range(spec.n_main - 1):
            s, t, _ = scale_shift(gammas[i], betas[i], out.means[i], out.variances[i], spec.units[i].eps)
            pre = out.acts[i].to(s.dtype) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
            self.entries.append((pre > 0).detach())
        if spec.final_relu:  # an open block's last activation runs in torch, through the tape
            self.entries.append((out.y > 0).detach())

    def max_pool(self, pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
        y, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                              return_indices=True)
        if self.mode == "replay":
            replayed = self._next(idx.numel()).to(x.device)
            self.flips += int((replayed != idx).sum().item())
            return x.flatten(2).gather(2, replayed.flatten(2)).view(idx.shape)
        if self.mode == "record":
            self.entries.append(idx)
        return y


class _TapeReLU(nn.Module):
    def __init__(self, tape: BranchTape):
        super().__init__()
        self.tape = tape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tape.relu(x)


class _TapeMaxPool(nn.Module):
    def __init__(self, pool: nn.MaxPool2d, tape: BranchTape):
        super().__init__()
        self.pool, self.tape = pool, tape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tape.max_pool(self.pool, x)


def _fused_units(model: nn.Module) -> int:
    """How many fused ops one forward of ``model`` calls: its fused blocks (with their shortcut units run as ops
    of their own; a block that will run eagerly counts one, so that its eager run is noticed) and fused stems."""
    return sum((max(1, len(m._next_ops())) if isinstance(m, _FusedForward) else 0)
               + (isinstance(m, FusedStemMixin) and m.backend is not None and bool(m._stem_units()))
               for m in model.modules())


def _attach_tape(model: nn.Module, tape: BranchTape) -> nn.Module:
    """Every torch ReLU and max-pool through ``tape``, except the activations of fused modules: those are computed
    inside the op (its masks are recorded from its outputs), and a swapped activation would make them run their
    eager computation instead. A fused block's submodules that it calls in torch (an open block's closing:
    ``_torch_children``) are taped like any other."""
    in_stems = {id(act) for m in model.modules() if isinstance(m, FusedStemMixin) and m.backend is not None
                and not isinstance(layout := m._stem_layout(), str) for act in layout[1].values()}
    for parent in list(model.modules()):
        in_torch = parent._torch_children() if isinstance(parent, _FusedForward) else None
        for name, child in list(parent.named_children()):
            if in_torch is not None and name not in in_torch:
                continue
            if type(child) is nn.ReLU and id(child) not in in_stems:
                setattr(parent, name, _TapeReLU(tape))
            elif type(child) is nn.MaxPool2d:
                setattr(parent, name, _TapeMaxPool(child, tape))
    return model


@contextlib.contextmanager
def _recording_fused_blocks(tape: BranchTape):
    """Route fused block forwards through ``tape.record_block`` (the op is opaque: its masks are recomputed);
    yields the list of calls made, so that a run that fused nothing is noticed."""
    original = ops.forward
    calls: list = []

    def recording(spec, x, params, residual, backend, sample_scale=None):
        out = original(spec, x, params, residual, backend, sample_scale)
        tape.record_block(spec, params.gammas, params.betas, out)
        calls.append(backend)
        return out

    ops.forward = recording
    try:
        yield calls
    finally:
        ops.forward = original


def compare_models(
    reference: nn.Module,
    make_fused: Callable[[nn.Module], nn.Module],
    x: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool = False,
    train_steps: int = 1,
    autocast: bool = False,
    lr: float = 0.0,
    seed: Optional[int] = None,
    record: Optional[dict] = None,
) -> List[Check]:
    """Compare ``make_fused(copy of reference)`` with PyTorch itself against the float64 oracle.

    Runs ``train_steps`` train-mode forward+backward passes (an SGD step with ``lr`` between them; running
    statistics update every pass), then an eval forward, of: PyTorch in ``dtype``, the fused model in ``dtype``,
    and two float64 copies of the reference, each replaying one low-precision run's branch decisions (see
    :class:`BranchTape`). Each run is measured against its own replay.
    Checks: train output, input grad, every parameter grad (worst reported), running means and variances
    (worst), num_batches_tracked (exact), branch flips (count), eval output. With ``autocast`` the models stay
    float32 and run under torch.autocast(dtype). ``seed``: the global RNG is seeded with ``seed + step`` before
    every training forward, so that stochastic modules (timm's DropPath) draw the same numbers in every run.
    ``record``: a dict filled with the last pass's outputs, input gradients and parameter gradients of each run by
    key ("same", "fused", "ref_same", "ref_fused") and the flip counts ("flips": fused's and PyTorch's), for analyses
    beyond the checks (bench/oracle_flips.py)."""
    param_dtype = torch.float32 if autocast else dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    keys = ("same", "fused", "ref_same", "ref_fused")
    tapes = {k: BranchTape() for k in keys}
    models = {
        "same": _attach_tape(copy.deepcopy(reference), tapes["same"]).to(device=device, dtype=param_dtype),
        "fused": _attach_tape(make_fused(copy.deepcopy(reference)), tapes["fused"]).to(device=device,
                                                                                      dtype=param_dtype),
    }
    for k in ("ref_same", "ref_fused"):
        models[k] = _attach_tape(copy.deepcopy(reference), tapes[k]).to(device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1234)
    outs: Dict[str, torch.Tensor] = {}
    xgrads: Dict[str, torch.Tensor] = {}
    for step in range(train_steps):
        grad_out = None
        for key in keys:
            model, tape = models[key], tapes[key]
            low = key in ("same", "fused")
            replay_of = {"ref_same": "same", "ref_fused": "fused"}.get(key)
            tape.start("replay", tapes[replay_of].entries) if replay_of else tape.start("record")
            model.train()
            model.zero_grad(set_to_none=True)
            xin = _input(x, device, param_dtype if low else torch.float64, fmt).requires_grad_(True)
            recording = _recording_fused_blocks(tape) if key == "fused" else contextlib.nullcontext([])
            if seed is not None:
                torch.manual_seed(seed + step)
            with recording as calls, torch.autocast(device.type, dtype=dtype, enabled=autocast and low):
                out = model(xin)
            if key == "fused" and (len(calls) != _fused_units(model) or not calls):
                raise RuntimeError(f"the converted model called the fused op {len(calls)} times for its "
                                   f"{_fused_units(model)} fused modules: where it ran its eager computation, "
                                   f"comparing it with torch would compare torch with itself")
            if grad_out is None:
                grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
            out.backward(grad_out.to(out.dtype))
            outs[key], xgrads[key] = out, xin.grad
            if step < train_steps - 1:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(p.grad, alpha=-lr)

    def pair(name: str, values: Dict[str, torch.Tensor]) -> Check:
        return check(name, values["fused"], values["ref_fused"], values["same"], values["ref_same"], dtype)

    results = [pair("train output", outs), pair("input grad", xgrads)]
    grads = {k: _named_grads(models[k]) for k in ("same", "fused", "ref_same", "ref_fused")}
    if record is not None:
        record.update(outs=dict(outs), xgrads=dict(xgrads), grads=grads,
                      flips={"fused": tapes["ref_fused"].flips, "same": tapes["ref_same"].flips})
    if set(grads["fused"]) != set(grads["ref_fused"]):
        missing = sorted(set(grads["ref_fused"]) ^ set(grads["fused"]))
        results.append(Check(f"param grads present ({missing[:3]})", float("inf"), 0.0, 0.0))
    else:
        params = {k: dict(models[k].named_parameters()) for k in keys}
        results.append(worst("param grads", [
            _scale_check(n, grads, params, dtype) if n.endswith(".residual_scale") or n == "residual_scale"
            else pair(n, {k: g[n] for k, g in grads.items()}) for n in grads["same"]]))
    buffers = {k: dict(models[k].named_buffers()) for k in keys}
    for kind in ("running_mean", "running_var"):
        names = [n for n in buffers["ref_fused"] if n.endswith(kind)]
        if names:
            results.append(worst(kind, [pair(n, {k: b[n] for k, b in buffers.items()}) for n in names]))
    nbt = [n for n in buffers["ref_fused"] if n.endswith("num_batches_tracked")]
    if nbt:
        bad = [n for n in nbt if not torch.equal(buffers["fused"][n].cpu(), buffers["ref_fused"][n].cpu())]
        results.append(Check(f"num_batches_tracked (exact{': ' + bad[0] if bad else ''})", float(len(bad)), 0.0,
                             0.0))
    # A wrong mask computation flips ~half the elements; rounding flips a handful (bound: 2x torch's + 16).
    flips_fused, flips_same = tapes["ref_fused"].flips, tapes["ref_same"].flips
    results.append(Check("branch flips vs float64 (count)", float(flips_fused), float(flips_same),
                         2.0 * flips_same + 16))
    evals = {}
    with torch.no_grad():
        for key in keys:
            tapes[key].start("off")
            models[key].eval()
            xin = _input(x, device, param_dtype if key in ("same", "fused") else torch.float64, fmt)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast and key in ("same", "fused")):
                evals[key] = models[key](xin)
    results.append(pair("eval output", evals))
    return results


def _scale_check(name: str, grads: Dict[str, Dict[str, torch.Tensor]], params: Dict[str, Dict[str, torch.Tensor]],
                 dtype: torch.dtype) -> Check:
    """The rule for a learnable residual scale α (y = relu(α·bn(a) + shortcut)). dα = Σ_c γ_c·S2_c + β_c·S1_c over
    the last BN's channels (S1, S2: its Σdz, Σdz·x̂), which a fused block takes from its fused reductions while
    PyTorch sums dz·bn(a) over every element at once. dα is then as accurate as the BN's own gradients
    dγ = α·S2, dβ = α·S1, times the cancellation of the channel sum: the bound is the rule on torch's worst error
    of those gradients, scaled by κ = Σ_c(|γ_c·dγ_c| + |β_c·dβ_c|) / |α·dα| of the float64 run."""
    prefix = name[: -len("residual_scale")]
    last = max((n for n in params["ref_fused"] if n.startswith(prefix + "bn") and n.count(".") == prefix.count(".") + 1
                and n.endswith(".weight")), key=lambda n: n)
    bn = last[: -len("weight")]
    ref, ref_g = params["ref_fused"], grads["ref_fused"]
    terms = ((ref[last] * ref_g[last]).abs().sum() + (ref[bn + "bias"] * ref_g[bn + "bias"]).abs().sum()).detach()
    alpha_grad = (ref[name] * ref_g[name]).abs().detach()
    kappa = float(terms / alpha_grad) if alpha_grad > 0 else float("inf")
    factor, floor = TOLERANCE[dtype]
    e_bn = max(rel_error(grads["same"][n], grads["ref_same"][n]) for n in (last, bn + "bias"))
    return Check(f"{name} (κ={kappa:.1f})", rel_error(grads["fused"][name], ref_g[name]),
                 rel_error(grads["same"][name], grads["ref_same"][name]), factor * e_bn * kappa + floor)


def saved_bytes_vs_design(block: nn.Module, x: torch.Tensor) -> Tuple[int, int, int]:
    """(bytes autograd saves for a fused block's backward, the design's minimum, bytes eager PyTorch saves), with
    parameters left out. The design (DESIGN §1): x, every conv's pre-BN output, y and two fp32 vectors per BN."""
    x = x.detach().requires_grad_(True)

    def saved(model) -> Tuple[int, torch.Tensor]:
        params = {p.data_ptr() for p in model.parameters()}
        sizes: Dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in params:
                sizes[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        return sum(sizes.values()), out

    total, y = saved(block)
    eager_total, _ = saved(revert(copy.deepcopy(block)))
    shortcut_convs = list(getattr(block, "downsample", None) or [])
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    acts, h = 0, x
    with torch.no_grad():
        for conv in convs:  # pre-BN outputs: every conv's output (the projection reads x)
            src = x if conv in shortcut_convs else h
            out = F.conv2d(src, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            acts += out.numel() * out.element_size()
            if conv not in shortcut_convs:
                h = out
    vectors = sum(2 * c.out_channels * 4 for c in convs)
    design = x.numel() * x.element_size() + acts + y.numel() * y.element_size() + vectors
    return total, design, eager_total


def print_table(title: str, checks: List[Check], out: Optional[Callable[[str], None]] = print) -> None:
    out(title)
    out(TABLE_HEADER)
    for c in checks:
        out(c.row())
