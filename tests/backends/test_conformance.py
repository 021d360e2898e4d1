"""Every registered backend against its own declared capabilities: each capability it declares is run (training
forward, backward, eval; or the running-statistics update) and compared with the reference backend in float64;
each it does not declare is refused, naming the capability, by dispatch (``unsupported_reason``), by convert
(``block_refusal``) and by the backend's block ops called directly. Parametrised from ``backends.names()`` and
from the fields of ``Capabilities``: a new backend or capability needs no edit here, a new capability one probe."""
import dataclasses

import pytest
import torch

from fused_resnet import backends
from fused_resnet.backends import reference
from fused_resnet.backends.registry import FLOAT_DTYPES, Capabilities
from fused_resnet.blocks import EagerBasicBlock, FusedBasicBlock
from fused_resnet.spec import BlockSpec, Shortcut, acc_dtype
from fused_resnet.tensors import Params

from conftest import block_problem

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative error (2-norm) allowed against float64, per dtype the backend computes in
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclasses.dataclass(frozen=True)
class Probe:
    """One use of one capability: ``needs(caps)`` says whether a backend with ``caps`` declares it; ``dtype``:
    the tensors'; ``block``: block_problem's arguments, or None for ``kind``'s own check."""

    capability: str
    label: str
    needs: object
    dtype: torch.dtype = torch.float32
    block: tuple = (Shortcut.IDENTITY, 2, True)
    kind: str = "ops"  # "ops", "dim1", "residual_scale", "drop_path", "running_update", "synced"


def _probes():
    probes = [Probe("dtypes", str(d).replace("torch.", ""), lambda c, d=d: d in c.dtypes, d)
              for d in sorted(FLOAT_DTYPES, key=str)]
    probes += [Probe("groups", "grouped", lambda c: c.groups, block=(Shortcut.IDENTITY, 3, True, 2, 1)),
               Probe("groups", "depthwise", lambda c: c.groups, block=(Shortcut.IDENTITY, 3, True, 6, 1)),
               Probe("dilation", "dilation-2", lambda c: c.dilation, block=(Shortcut.IDENTITY, 3, True, 1, 2)),
               Probe("dilation", "dilation-2-eval", lambda c: c.dilation, block=(Shortcut.PROJECTION, 3, False, 1, 2)),
               Probe("dims", "1-D", lambda c: 1 in c.dims, kind="dim1"),
               Probe("synced_bn", "synced", lambda c: c.synced_bn, kind="synced"),
               Probe("residual_scale", "alpha", lambda c: c.residual_scale, kind="residual_scale"),
               Probe("drop_path", "drop-path", lambda c: c.drop_path, kind="drop_path"),
               Probe("drop_path", "drop-path-projection", lambda c: c.drop_path,
                     block=(Shortcut.PROJECTION, 2, True), kind="drop_path"),
               # timm's "-d" shortcut: the projection reads the input through AvgPool2d(2, 2, ceil_mode=True)
               Probe("avg_pool", "pooled-projection", lambda c: c.avg_pool,
                     block=(Shortcut.PROJECTION, 3, True, 1, 1, 0, 2)),
               Probe("avg_pool", "pooled-projection-eval", lambda c: c.avg_pool,
                     block=(Shortcut.PROJECTION, 2, False, 1, 1, 0, 2)),
               Probe("avg_pool", "pooled-open-unit", lambda c: c.avg_pool, block=(Shortcut.OPEN, 1, True, 1, 1, 0, 2))]
    probes += [Probe("shortcuts", k.name.lower(), lambda c, k=k: k in c.shortcuts,
                     block=(k, 1 if k == Shortcut.NONE else 2, True)) for k in Shortcut]
    probes += [Probe("running_update_dtypes", str(d).replace("torch.", ""),
                     lambda c, d=d: d in c.running_update_dtypes, d, kind="running_update")
               for d in (torch.float32, torch.float64)]
    return probes


PROBES = _probes()


def test_every_capability_has_a_probe():
    assert {p.capability for p in PROBES} == {f.name for f in dataclasses.fields(Capabilities)}


def _rel(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _params(p, dtype, device):
    stat = acc_dtype(dtype)
    return Params([w.detach().to(device, dtype) for w in p["weights"]],
                  *[[t.detach().to(device, stat) for t in p[k]]
                    for k in ("gammas", "betas", "running_means", "running_vars")])


def _outputs(backend, spec, x, params, res, dy, sample_scale=None):
    """What the checks compare: the training forward's y and pre-BN outputs, every gradient, eval's y."""
    scale = {} if sample_scale is None else {"sample_scale": sample_scale.to(x.device, x.dtype)}
    out = backend.block_forward(spec, x, params, res, **scale)
    grads = backend.block_backward(spec, dy, x, params, out, True, **scale)
    eval_spec = spec.with_batch_stats([False] * len(spec.units))
    named = {"y": out.y, "eval": backend.block_inference(eval_spec, x, params, res), "dx": grads.dx}
    named.update({f"a{i}": a for i, a in enumerate(out.acts)})
    for k in ("dws", "dgammas", "dbetas"):
        named.update({f"{k}{i}": v for i, v in enumerate(getattr(grads, k))})
    if res is not None:
        named["d_residual"] = grads.d_residual
    return named


def _run_ops(backend, probe):
    """The backend in the probe's dtype against the reference in float64: each output's error within 4x the
    reference backend's own in that dtype (BN's backward over 40 values per channel amplifies 16-bit rounding)
    or the dtype's tolerance."""
    p = block_problem(*probe.block)
    spec, dtype = p["spec"], probe.dtype
    dy = torch.randn(spec.output_shapes(p["x"].shape, [w.shape for w in p["weights"]])[spec.n_main - 1],
                     dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = p["residual"]
    # stochastic depth: sample 1 dropped, the others kept with keep = 0.8
    scale = torch.tensor([1.25, 0.0] + [1.25] * (p["x"].shape[0] - 2)) if probe.kind == "drop_path" else None

    def run(b, dt, device):
        return _outputs(b, spec, p["x"].detach().to(device, dt), _params(p, dt, device),
                        None if res is None else res.detach().to(device, dt), dy.to(device, dt), scale)

    exact = run(reference.ReferenceBackend(), torch.float64, "cpu")
    same = run(reference.ReferenceBackend(), dtype, "cpu")
    got = run(backend, dtype, DEVICE)
    for name, want in exact.items():
        err = _rel(got[name], want)
        assert err <= max(TOLERANCE[dtype], 4 * _rel(same[name], want)), (name, err, _rel(same[name], want))


def _run_module(name, probe):
    kwargs = dict(dim=1) if probe.kind == "dim1" else dict(residual_scale=0.5)
    eager = EagerBasicBlock(6, 6, **kwargs).double()
    fused = FusedBasicBlock(6, 6, backend=name, **kwargs).double()
    fused.load_state_dict(eager.state_dict())
    fused, eager = fused.to(DEVICE).float(), eager  # the float64 eager block is the reference
    shape = (2, 6, 7) if probe.kind == "dim1" else (2, 6, 5, 4)
    x64 = torch.randn(shape, dtype=torch.float64).requires_grad_()
    x = x64.detach().to(DEVICE, torch.float32).requires_grad_()
    y, y64 = fused(x), eager(x64)
    y.backward(torch.ones_like(y))
    y64.backward(torch.ones_like(y64))
    assert _rel(y, y64) < 1e-4 and _rel(x.grad, x64.grad) < 1e-4
    for (n, a), (_, b) in zip(fused.named_parameters(), eager.named_parameters()):
        assert _rel(a.grad, b.grad) < 1e-4, n


def _run_running_update(backend, dtype):
    g = torch.Generator().manual_seed(2)
    mean, var = torch.randn(6, generator=g, dtype=dtype), torch.rand(6, generator=g, dtype=dtype) + 0.5
    states = [[torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype), torch.tensor(3)] for _ in range(2)]
    states[0] = [t.to(DEVICE) for t in states[0]]
    backend.bn_running_update(*states[0], mean.to(DEVICE), var.to(DEVICE), 40, 0.1)
    reference.bn_running_update(*states[1], mean, var, 40, 0.1)
    for got, want in zip(states[0], states[1]):
        torch.testing.assert_close(got.cpu(), want)


def _refusal_spec(probe):
    if probe.kind == "dim1":
        return BlockSpec(block_problem(Shortcut.IDENTITY, 2, True)["spec"].units, dim=1)
    if probe.kind == "synced":
        units = block_problem(Shortcut.IDENTITY, 2, True)["spec"].units
        return BlockSpec(tuple(dataclasses.replace(u, sync_group=1) for u in units))
    return block_problem(*probe.block)["spec"]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: f"{p.capability}-{p.label}")
@pytest.mark.parametrize("name", backends.names())
def test_a_backend_runs_what_it_declares_and_refuses_the_rest_naming_it(name, probe):
    reason = backends.backend_status()[name]
    if reason is not None:
        pytest.skip(f"backend {name!r} is not available here: {reason}")
    backend = backends.get(name)
    if backend.device_refusal(DEVICE.type) is not None:
        pytest.skip(backend.device_refusal(DEVICE.type))
    declared = probe.needs(backend.capabilities)
    named = f"capability '{probe.capability}'"
    if probe.kind == "running_update":
        if declared:
            _run_running_update(backend, probe.dtype)
        else:
            assert named in backend.running_update_unsupported_reason(DEVICE.type, probe.dtype)
        return
    if probe.kind == "residual_scale":
        if declared:
            _run_module(name, probe)
        else:
            assert named in backends.block_refusal(name, _refusal_spec(probe), residual_scale=True)
        return
    if probe.kind == "drop_path":
        spec = _refusal_spec(probe)
        open_spec = BlockSpec(spec.units[:spec.n_main], Shortcut.OPEN)  # no closing: refused by every backend
        assert named in backend.capabilities.refusal(open_spec, drop_path=True)
        if declared:
            _run_ops(backend, probe)
            assert backends.drop_path_refusal(name, spec) is None
            return
        assert named in backends.drop_path_refusal(name, spec)
        p = block_problem(*probe.block)
        x = p["x"].detach().to(DEVICE, torch.float32)
        with pytest.raises(NotImplementedError, match=named):
            backend.block_forward(spec, x, _params(p, x.dtype, DEVICE), None,
                                  sample_scale=torch.ones(x.shape[0], device=DEVICE))
        return
    if declared:
        if probe.kind == "synced":
            pytest.skip("a synchronised BN needs a process group: tests/test_distributed.py runs it")
        _run_module(name, probe) if probe.kind == "dim1" else _run_ops(backend, probe)
        return
    spec = _refusal_spec(probe)
    assert named in backend.unsupported_reason(DEVICE.type, probe.dtype, spec)
    if probe.capability != "dtypes":
        assert named in backends.block_refusal(name, spec)
    p = block_problem(*probe.block)
    x = p["x"].detach().to(DEVICE, probe.dtype)
    with pytest.raises((TypeError, ValueError, NotImplementedError), match=named):
        backend.block_forward(spec, x, _params(p, probe.dtype, DEVICE), None)
