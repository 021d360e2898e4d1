"""timm's ResNet family fused in place (fused_resnet/timm_blocks.py): every block of resnet18, resnet50d (avg-pool
downsample, deep stem), resnet26t and wide_resnet50_2 fuses, and the converted model matches timm's against the
float64 oracle over training passes; blocks with squeeze-excitation / attention, or stochastic depth on a backend
without it, fuse their units and close in torch with timm's own modules (float64: timm's numbers and gradients
under the same seed, train and eval; the oracle on backend triton here, on reference and cuda in
tests/test_model_families.py); stochastic depth on a backend that declares it is inside the op's closing, with
timm's draws (reference in float64, triton's kernels against the oracle); blocks with
DropBlock are left as timm's with a warning; a block changed after convert runs timm's own forward; revert gives
timm's classes back; timm's feature APIs (features_only=True models, forward_intermediates) on converted models give
the unconverted model's features and gradients in float64."""
import dataclasses
import warnings

import pytest
import torch

import fused_resnet
from fused_resnet import backends, testing
from fused_resnet.spec import Shortcut
from fused_resnet.testing import coverage

from conftest import assert_checks

timm = pytest.importorskip("timm")
from fused_resnet import timm_blocks  # noqa: E402  (needs timm)

FUSED = (timm_blocks.FusedTimmBasicBlock, timm_blocks.FusedTimmBottleneck)
TIMM = (timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck)


def _model(name, **kwargs):
    torch.manual_seed(0)
    return testing.randomize_batchnorm(timm.create_model(name, num_classes=4, **kwargs),
                                       torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50d", 16), ("resnet26t", 8),
                                         ("wide_resnet50_2", 16)])
def test_timm_resnets_fuse_every_block_and_match_timm(name, blocks):
    model = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fused_resnet.convert(model, backend="reference")
    assert sum(isinstance(m, FUSED) for m in fused.modules()) == blocks
    assert list(fused.state_dict()) == list(model.state_dict())
    checks = testing.compare_models(model, lambda m: fused_resnet.convert(m, backend="reference", inplace=True),
                                    torch.randn(2, 3, 48, 48), torch.float32, torch.device("cpu"), train_steps=2,
                                    lr=0.01)
    assert_checks(checks, name)


# (model, kwargs, a backend on which its blocks are open): an se makes them open, a drop_path after it is then
# timm's module in the torch closing (every backend computes a drop_path the op closes: capability drop_path)
OPEN = [("seresnet18", {}, "reference"), ("seresnet18", {"drop_path_rate": 0.2}, "cuda")]
OPEN_IDS = ["seresnet18", "seresnet18-drop_path-cuda"]


def _open_blocks(model):
    return [m for m in model.modules() if isinstance(m, FUSED) and timm_blocks.is_open(m)]


def _available(backend):
    if backends.backend_status()[backend] is not None:
        pytest.skip(f"backend {backend!r} is not available here: {backends.backend_status()[backend]}")


@pytest.mark.parametrize("name,kwargs,backend", OPEN, ids=OPEN_IDS)
def test_se_and_drop_path_blocks_fuse_their_units_and_close_in_torch(name, kwargs, backend):
    _available(backend)
    model = _model(name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fused_resnet.convert(model, backend=backend)
    blocks = [m for m in fused.modules() if isinstance(m, TIMM)]
    assert all(isinstance(m, FUSED) for m in blocks)
    assert len(_open_blocks(fused)) == sum(m.se is not None or m.drop_path is not None for m in blocks) >= 7
    assert list(fused.state_dict()) == list(model.state_dict())
    report = fused_resnet.conversion_report(fused)
    part = "se (SEModule), drop_path (DropPath)" if kwargs else "se (SEModule)"
    assert f"conv-BN units fused; closing in torch: {part}, + shortcut, act2 (ReLU)" in report
    assert (f"conv-BN units fused (the shortcut's as an op of its own); closing in torch: {part}, + shortcut, "
            f"act2 (ReLU)") in report  # layer2.0, layer3.0, layer4.0
    # every unit: 8 blocks of 2 units, 3 projections (ops of their own), the stem
    assert coverage.fused_unit_count(fused) == 20 and coverage.unit_count(fused) == 20


def _run(model, x, grad, seed):
    """y, dx and every parameter's gradient of one forward + backward, the global RNG seeded first."""
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(xi)
    y.backward(grad)
    return {"y": y, "dx": xi.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("name,kwargs,backend", OPEN, ids=OPEN_IDS)
def test_open_blocks_give_timms_numbers_and_gradients_in_float64(name, kwargs, backend):
    """float64 (the ops on backend reference: cuda's fall back to it for float64) against the unconverted model
    under the same seed (DropPath's draws are timm's): train (two passes: running statistics too) and eval, forward
    and backward, within float64 rounding."""
    _available(backend)
    model = _model(name, **kwargs).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cuda's ops name the reference backend running float64
        fused = fused_resnet.convert(model, backend=backend)
        _same_as_timm(model, fused)
    if kwargs:  # the paths were dropped for some samples in training (else DropPath was never exercised)
        torch.manual_seed(1)
        assert any((m.drop_path(torch.ones(8, 1, 1, 1, dtype=torch.float64)) == 0).any()
                   for m in _open_blocks(fused.train()) if m.drop_path is not None)


def _same_as_timm(model, fused):
    """Train (two passes) and eval, under the same seeds: y, dx, every parameter gradient and buffer of the fused
    model within float64 rounding of timm's."""
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    grad = torch.randn(4, 4, dtype=torch.float64)
    for train, seed in ((True, 1), (True, 2), (False, 3)):
        model.train(train), fused.train(train)
        want, got = _run(model, x, grad, seed), _run(fused, x, grad, seed)
        for k, w in want.items():
            err = float((got[k] - w).detach().norm() / w.detach().norm().clamp(min=1e-300))
            assert err < 1e-10, (train, k, err)
    for (k, b), w in zip(fused.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, w, rtol=1e-12, atol=1e-12, msg=k)


def _scales_seen(monkeypatch):
    """The sample_scale of every fused training op call (None where it had none)."""
    seen, real = [], fused_resnet.ops.forward

    def spy(spec, x, params, residual, backend, sample_scale=None):
        seen.append(None if sample_scale is None else sample_scale.detach().clone())
        return real(spec, x, params, residual, backend, sample_scale)

    monkeypatch.setattr(fused_resnet.ops, "forward", spy)
    return seen


def test_drop_path_inside_the_op_gives_timms_numbers_and_draws(monkeypatch):
    """On a backend that declares drop_path (reference here) a stochastic-depth block is not open: the op's
    closing scales each sample's branch, with the mask drawn as timm draws it (float64: timm's outputs, gradients
    and running statistics under the same seed, two training passes and eval); samples were dropped and kept."""
    model = _model("resnet18", drop_path_rate=0.3).double()
    fused = fused_resnet.convert(model, backend="reference")
    blocks = [m for m in fused.modules() if isinstance(m, FUSED)]
    assert len(blocks) == 8 and not _open_blocks(fused)
    assert [m.block_spec().shortcut for m in blocks] == [Shortcut.IDENTITY] * 2 + [Shortcut.PROJECTION,
                                                                                   Shortcut.IDENTITY] * 3
    assert "closing in torch" not in fused_resnet.conversion_report(fused)
    seen = _scales_seen(monkeypatch)
    _same_as_timm(model, fused)
    drawn = torch.cat([s for s in seen if s is not None])
    assert seen[0] is None and seen[1] is None  # the stem; layer1.0 (drop_path_rate grows with depth from 0)
    assert (drawn == 0).any() and (drawn > 1).any()  # dropped (0) and kept (1 / keep) samples


def test_drop_path_runs_in_torch_where_the_op_cannot_compute_it_exactly(monkeypatch):
    """A hook on drop_path (it fires), another module in its slot, another last activation, an se before it: the
    block is open (timm's modules close it); drop_prob set to 0 after a forward: no mask drawn (timm draws
    none either); eval: none."""
    model = _model("resnet18", drop_path_rate=0.3)
    fused = fused_resnet.convert(model, backend="reference")
    block, x = fused.layer2[1], torch.randn(2, 3, 32, 32)
    assert not timm_blocks.is_open(block)
    fired = []
    handle = block.drop_path.register_forward_hook(lambda m, i, o: fired.append(1))
    assert timm_blocks.is_open(block) and block._blocker() is None
    fused(x)
    assert fired == [1]
    handle.remove()
    assert not timm_blocks.is_open(block)
    block.act2 = torch.nn.GELU()
    assert timm_blocks.is_open(block) and block._blocker() is None
    block.act2 = torch.nn.ReLU(inplace=True)
    block.drop_path = torch.nn.Dropout(0.1)
    assert timm_blocks.is_open(block)
    block.drop_path = timm.layers.DropPath(0.3)
    assert not timm_blocks.is_open(block)
    seen = _scales_seen(monkeypatch)
    fused(x)
    block.drop_path.drop_prob = 0.0
    fused(x)
    fused.eval()(x)
    # 9 op calls per forward (the stem's, then the blocks': the projections are units of their ops), layer2.1's
    # the 5th; eval (with parameters that need gradients: the training op) draws no mask
    assert len(seen) == 27 and seen[4] is not None and seen[9 + 4] is None and seen[18:] == [None] * 9


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_drop_path_inside_the_op_matches_the_oracle(monkeypatch, backend):
    """The Triton kernels' and the extension's closing and first backward reduction with stochastic depth (a
    projection Bottleneck: the shortcut BN's sums of the unscaled gradient; an identity BasicBlock), against the
    oracle, samples dropped."""
    _available(backend)
    from timm.layers import DropPath

    seen = _scales_seen(monkeypatch)
    for projection in (True, False):
        torch.manual_seed(0)
        if projection:
            ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))
            block = timm.models.resnet.Bottleneck(8, 4, stride=2, downsample=ds, drop_path=DropPath(0.5))
        else:
            block = timm.models.resnet.BasicBlock(8, 8, drop_path=DropPath(0.5))
        testing.randomize_batchnorm(block, torch.Generator().manual_seed(0))
        fused = []
        checks = testing.compare_models(block, lambda m: fused.append(fused_resnet.convert(m, backend=backend,
                                                                                           inplace=True)) or fused[-1],
                                        torch.randn(4, 8, 6, 6), torch.float32, torch.device("cpu"),
                                        train_steps=2, lr=0.01, seed=3)
        assert_checks(checks, f"DropPath {'Bottleneck' if projection else 'BasicBlock'} on {backend}")
        assert not timm_blocks.is_open(fused[-1])
    drawn = torch.cat(seen)
    assert (drawn == 0).any() and (drawn == 2).any()


def test_an_open_block_matches_the_oracle_on_triton():
    """One SE + DropPath Bottleneck (the Triton interpreter is slow: a block, not a model) on backend triton."""
    if backends.backend_status()["triton"] is not None:
        pytest.skip(f"backend 'triton' is not available here: {backends.backend_status()['triton']}")
    from timm.layers import DropPath

    torch.manual_seed(0)
    ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))
    block = timm.models.resnet.Bottleneck(8, 4, stride=2, downsample=ds, attn_layer="se", drop_path=DropPath(0.5))
    testing.randomize_batchnorm(block, torch.Generator().manual_seed(0))
    checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="triton", inplace=True),
                                    torch.randn(4, 8, 6, 6), torch.float32, torch.device("cpu"), train_steps=2,
                                    lr=0.01, seed=3)
    assert_checks(checks, "SE + DropPath Bottleneck on triton")


def test_an_open_blocks_closing_modules_run_as_themselves():
    """A hook on se fires and the block stays fused (se is called, not fused away); a hook on the downsample fires
    too: its projection then runs as timm's modules, not as an op; se removed after convert turns the block into
    one the op closes, the projection a unit of its op; a DropBlock is inside the chain: left as timm's, with a
    warning."""
    fused = fused_resnet.convert(_model("seresnet18"), backend="reference")
    block, seen = fused.layer2[0], []
    block.se.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 32, 32)
    assert len(block._next_ops()) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)
        block.downsample.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert block._next_ops() == [[block.bn1, block.bn2]] and "downsample (Sequential)" in block._torch_part()
        fused(x)
    assert seen == [torch.Size([2, 128, 4, 4])] * 3 and block._blocker() is None
    block.se = None
    assert block.block_spec().shortcut == Shortcut.PROJECTION and block._torch_part() is None
    with pytest.warns(RuntimeWarning, match="drop_block is DropBlock2d"):
        fused_resnet.convert(_model("resnet18", drop_block_rate=0.1), backend="reference")


def _pooling_backend():
    """A backend that pools inside its ops here: cuda's CPU registrations where the extension loaded, else
    reference."""
    return "cuda" if not backends.backend_status()["cuda"] else "reference"


def test_the_avg_pool_shortcut_is_the_ops_projection():
    """resnet26d's "-d" shortcuts (AvgPool2d + conv + BN, and nn.Identity + conv + BN in layer1) are the block op's
    projection: the pool inside it (capability avg_pool), the identity skipped, one op per block, timm's numbers
    in float64. Changed after convert — the pool's ceil_mode, the conv given a bias — the call runs timm's forward
    after a warning naming the submodule; a hook on the pool makes it run as itself, the conv-BN an op of its own,
    the hook firing; a block planned anew with a biased conv runs its downsample as timm's modules."""
    model = _model("resnet26d").double()
    fused = fused_resnet.convert(_model("resnet26d").double(), backend="reference")
    _same_as_timm(model, fused)
    fused = fused_resnet.convert(_model("resnet26d"), backend=_pooling_backend())
    first, block = fused.layer1[0], fused.layer2[0]
    for b, k in ((first, 1), (block, 2)):
        assert b._next_ops() == [[b.bn1, b.bn2, b.bn3, b.downsample[2]]] and b._torch_part() is None
        spec = b.block_spec()
        assert spec.shortcut == Shortcut.PROJECTION and [u.avg_pool for u in spec.units] == [1, 1, 1, k]
    x = torch.randn(2, 3, 64, 64)
    calls = [(c.name, tuple(c.unit_names)) for c in fused_resnet.warmup.block_calls(fused, x)]
    assert calls[0] == ("layer1.0", ("conv1", "conv2", "conv3", "downsample.1")) and len(calls) == 8
    block.downsample[0].ceil_mode = False
    with pytest.warns(RuntimeWarning, match="downsample.0 / downsample.1 / downsample.2: AvgPool2d.*ceil_mode=False"):
        fused(x)
    block.downsample[0].ceil_mode = True
    block.downsample[1].bias = torch.nn.Parameter(torch.zeros(block.downsample[1].out_channels))
    with pytest.warns(RuntimeWarning, match="downsample.1 / downsample.2: conv has a bias"):
        fused(x)
    block.downsample[1].bias = None
    seen = []
    handle = block.downsample[0].register_forward_hook(lambda *a: seen.append(1))
    assert block._next_ops() == [[block.bn1, block.bn2, block.bn3], [block.downsample[2]]]
    assert "the shortcut's conv-BN fused as an op of its own after its AvgPool2d in torch" in block._torch_part()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)
    assert seen == [1]
    handle.remove()  # a new structure: a conv bias now makes the downsample run as itself, exactly, no warning
    block.downsample[1].bias = torch.nn.Parameter(torch.zeros(block.downsample[1].out_channels))
    assert block._next_ops() == [[block.bn1, block.bn2, block.bn3]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)


def test_without_capability_avg_pool_the_pool_runs_in_torch(monkeypatch):
    """On a backend that does not declare avg_pool, a "-d" shortcut's pool runs in torch and its conv-BN as a
    one-unit open op whose output the block's op adds; warm_up and conversion_report(model, x) see both ops; a conv
    given a bias after convert makes the downsample run as timm's modules (no warning: exact either way)."""
    backend = backends.get("reference")
    monkeypatch.setattr(backend, "capabilities", dataclasses.replace(backend.capabilities, avg_pool=False))
    monkeypatch.setattr(backends.registry, "_RESOLVED", {})  # resolutions under these capabilities: dropped after
    model = _model("resnet26d").double()
    fused = fused_resnet.convert(_model("resnet26d").double(), backend="reference")
    block = fused.layer2[0]
    assert block._next_ops() == [[block.bn1, block.bn2, block.bn3], [block.downsample[2]]]
    assert "the shortcut's conv-BN fused as an op of its own after its AvgPool2d in torch" in block._torch_part()
    _same_as_timm(model, fused)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    calls = [(c.name, tuple(c.unit_names)) for c in fused_resnet.warmup.block_calls(fused, x)]
    assert calls[:2] == [("layer1.0", ("conv1", "conv2", "conv3", "downsample.1")),  # nn.Identity: no pool
                         ("layer1.1", ("conv1", "conv2", "conv3"))]  # the deep stem runs in torch
    assert len(calls) == 8 + 3
    assert "after its AvgPool2d in torch" in fused_resnet.conversion_report(fused, x)
    block.downsample[1].bias = torch.nn.Parameter(torch.zeros(block.downsample[1].out_channels,
                                                              dtype=torch.float64))
    assert block._next_ops() == [[block.bn1, block.bn2, block.bn3]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)


@pytest.mark.parametrize("name,units", [("resnet18", 1), ("resnet26d", 0)])
def test_timms_stem_is_one_fused_op_and_gives_timms_numbers(name, units, monkeypatch):
    """timm's ResNet becomes FusedTimmResNet in place: its 7x7 stem runs as one op in forward (float64: timm's
    outputs, gradients and running statistics, train twice and eval), the deep stem as timm's modules (the report
    says why); forward_intermediates and gradient checkpointing run timm's stem modules and give timm's numbers
    too; a hook on an activation of the stem fires (the stem runs its modules, with a warning naming it); revert
    gives timm's class back; the state_dict keys are timm's."""
    model = _model(name).double()
    fused = fused_resnet.convert(model, backend="reference")
    assert type(fused) is timm_blocks.FusedTimmResNet and list(fused.state_dict()) == list(model.state_dict())
    assert len(fused._stem_units()) == units
    first = fused_resnet.conversion_report(fused).splitlines()[0]
    assert ("stem fused, backend 'reference'" if units else timm_blocks.DEEP_STEM) in first
    specs = []
    real = fused_resnet.ops.forward
    monkeypatch.setattr(fused_resnet.ops, "forward", lambda spec, *a: specs.append(spec) or real(spec, *a))
    _same_as_timm(model, fused)
    stem_op = len(specs[0].units) == 1 and specs[0].shortcut == Shortcut.NONE  # the stem's op comes first
    assert stem_op == bool(units)
    if not units:
        return
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for m in (model, fused):
        m.eval()
    want, got = model.forward_intermediates(x), fused.forward_intermediates(x)
    for w, g in zip([want[0], *want[1]], [got[0], *got[1]]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    fused.set_grad_checkpointing(True), model.set_grad_checkpointing(True)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    fused.set_grad_checkpointing(False)
    fired = []
    fused.act1.register_forward_hook(lambda m, i, o: fired.append(o.shape))
    with pytest.warns(RuntimeWarning, match="stem: hooks on act1"):
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    assert fired == [torch.Size([2, 64, 16, 16])]
    assert type(fused_resnet.revert(fused)) is timm.models.resnet.ResNet


def test_a_timm_block_changed_after_convert_runs_timms_forward():
    model = _model("resnet18").eval()
    fused = fused_resnet.convert(model, backend="reference")
    for m in (model, fused):
        m.layer2[0].act1 = torch.nn.GELU()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match=r"layer2.0 runs its eager torch computation.*act1 is GELU"):
        got = fused(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_revert_gives_timms_classes_and_state_back():
    model = _model("resnet50d")
    fused = fused_resnet.convert(model, backend="reference")
    back = fused_resnet.revert(fused)
    assert {type(m) for m in back.modules() if isinstance(m, TIMM)} <= set(TIMM)
    assert not any(isinstance(m, FUSED) or hasattr(m, "backend") for m in back.modules())
    back.load_state_dict(model.state_dict(), strict=True)


def test_timm_fx_feature_extraction_runs_forward_and_backward_on_the_default_backend():
    """timm's own FX route (timm.models._features_fx, which its forward_fx / backward_fx model tests use) traces a
    model converted for the default backend, in train and eval mode, and gives timm's outputs and gradients."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = _model("resnet18")
    fused = fused_resnet.convert(model)
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        outs = []
        for m in (model, fused):
            m.train(train)
            last = get_graph_node_names(m)[0 if train else 1][-1]
            xi = x.clone().requires_grad_(True)
            y = create_feature_extractor(m, [last])(xi)[last]
            y.square().sum().backward()
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0], outs[1])


@pytest.fixture
def one_thread():
    """Small float64 models: one intra-op thread (on a loaded 2-core machine, two made these tests 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fused_calls(monkeypatch):
    """Every call of the fused training and inference ops."""
    calls = []
    for name in ("forward", "inference"):
        real = getattr(fused_resnet.ops, name)
        monkeypatch.setattr(fused_resnet.ops, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


def _features_pass(model, x, run, train):
    """(features, input grad, parameter grads, buffers) of one pass of ``run(model, x)`` (a list of feature maps):
    in training, the backward of a fixed random weighting of every feature; in eval, the features only."""
    model.train(train)
    x = x.clone().requires_grad_(train)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train):
        feats = run(model, x)
    if not train:
        return feats
    gen = torch.Generator().manual_seed(1)
    sum((f * torch.randn(f.shape, generator=gen, dtype=f.dtype)).sum() for f in feats).backward()
    return (feats, x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers()))


def _far(got, want, where=""):
    """Where ``got`` differs from ``want`` by more than float64's floor of the oracle rule (1e-10 relative to the
    tensor's norm: sums reassociated through train-mode BNs over few values), as strings."""
    if isinstance(want, dict):
        return [e for k in want for e in _far(got[k], want[k], f"{where}[{k!r}]")]
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        return [e for i, (g, w) in enumerate(zip(got, want)) for e in _far(g, w, f"{where}[{i}]")]
    if want is None or got is None:  # a parameter the call does not reach has no gradient
        return [] if got is want else [f"{where}: {got!r:.20} where timm gives {want!r:.20}"]
    err = testing.rel_error(got, want)
    return [] if err <= testing.TOLERANCE[torch.float64][1] and got.dtype == want.dtype else [f"{where}: {err:.1e}"]


def _assert_same_features(timm_model, fused, x, run, calls, blocks):
    for train in (True, False):
        calls.clear()
        got, want = _features_pass(fused, x, run, train), _features_pass(timm_model, x, run, train)
        far = _far(got, want)
        assert not far, f"{'train' if train else 'eval'}: {far}"
        assert len(calls) == blocks, f"{len(calls)} fused op calls, expected {blocks}"


@pytest.mark.parametrize("backend", ["auto", "reference"])
# ops: fused op calls per forward (resnet26d's avg-pool shortcuts are their blocks' projections: no op of their own)
@pytest.mark.parametrize("name,blocks,ops", [("resnet18", 8, 8), ("resnet26d", 8, 8)])
def test_features_only_models_convert_and_give_timms_features(name, blocks, ops, backend, monkeypatch, one_thread):
    """timm.create_model(..., features_only=True) (a FeatureListNet holding the model's stages): convert fuses
    every block, and the converted model gives the unconverted one's feature maps, input and parameter gradients
    and running statistics (train), and feature maps (eval), in float64 with every BN randomised."""
    model = _model(name, features_only=True).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fused_resnet.convert(model, backend=backend)
    assert sum(isinstance(m, FUSED) for m in fused.modules()) == blocks
    calls = _fused_calls(monkeypatch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    # backend auto on a CPU runs timm's modules (no fused op call); reference, the fused op of every block
    _assert_same_features(model, fused, x, lambda m, xi: m(xi), calls, ops if backend == "reference" else 0)
    assert len(fused(x)) == len(model.feature_info.channels()) == 5


@pytest.mark.skipif(not hasattr(timm.models.resnet.ResNet, "forward_intermediates"),
                    reason="this timm has no forward_intermediates")
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kwargs,blocks", [({}, 8), ({"indices": [1, 3], "stop_early": True}, 6)],
                         ids=["all", "stop-early"])
def test_forward_intermediates_of_a_converted_model_gives_timms(kwargs, blocks, backend, monkeypatch, one_thread):
    """model.forward_intermediates on a converted resnet18 runs the fused blocks and gives timm's final features and
    intermediates (train: with gradients), in float64 with every BN randomised."""
    model = _model("resnet18").double()
    fused = fused_resnet.convert(model, backend=backend)
    calls = _fused_calls(monkeypatch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def run(m, xi):
        out = m.forward_intermediates(xi, **kwargs)
        return [*out[1]] + ([] if kwargs.get("stop_early") else [out[0]])

    _assert_same_features(model, fused, x, run, calls, blocks if backend == "reference" else 0)
