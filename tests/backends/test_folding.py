"""The eval-mode BN fold cache (fused_resnet/backends/folding.py) shared by backends cuda and triton.

Folded weights live in persistent buffers refreshed in place: after in-place edits, load_state_dict, an optimizer
step and a training pass's running statistics the buffers keep their addresses and equal a fresh fold; nothing
is refolded while nothing changed (the refold's own writes included); module conversions get buffers of the new
dtype; inference-mode models; the cache stays bounded; and under a CUDA graph capture (simulated on the CPU: the
capture query patched) every call records the fold instead of trusting the cache."""
import copy
import gc

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import fused_resnet
from fused_resnet import testing
from fused_resnet.backends import folding, reference


class _Ops(TorchDispatchMode):
    """Records the name of every aten op run inside."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _block(seed=0):
    torch.manual_seed(seed)
    block = torchvision.models.resnet.BasicBlock(8, 8)
    return testing.randomize_batchnorm(block, torch.Generator().manual_seed(seed)).eval()


def _units(block):
    return [(block.conv1, block.bn1), (block.conv2, block.bn2)]


def _sources(conv, bn):
    return conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var


def _fold(block):
    return [folding.fold_bn(*_sources(c, b), b.eps) for c, b in _units(block)]


def _expected(conv, bn):
    """The fold written out with the reference's BN affine map."""
    s, t, _ = reference.scale_shift(bn.weight, bn.bias, bn.running_mean.float(), bn.running_var.float(), bn.eps)
    return (conv.weight.float() * s.view(-1, 1, 1, 1)).to(conv.weight.dtype), t


def _fresh(block, monkeypatch):
    """A fold of the block's current state by an empty cache."""
    with monkeypatch.context() as m:
        m.setattr(folding, "_FOLD_CACHE", {})
        return [(w.clone(), t.clone()) for w, t in _fold(block)]


def _addresses(folded):
    return [(w.data_ptr(), t.data_ptr()) for w, t in folded]


def _simulate_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_buffers_keep_their_address_and_follow_every_change(monkeypatch):
    block = _block()
    folded = _fold(block)
    addresses = _addresses(folded)
    for (w, t), (conv, bn) in zip(folded, _units(block)):
        assert w.dtype == conv.weight.dtype and w.is_contiguous(memory_format=torch.channels_last)
        assert t.dtype == torch.float32
    opt = torch.optim.SGD(block.parameters(), lr=0.5, momentum=0.9)

    def edit_weights():
        with torch.no_grad():
            block.conv1.weight[0].neg_()
            block.bn2.weight.mul_(2.0)

    def edit_running_stats():
        with torch.no_grad():
            block.bn1.running_var.mul_(3.0)
            block.bn2.running_mean.add_(0.5)

    def load_other():
        block.load_state_dict(_block(seed=1).state_dict())

    def optimizer_step():
        for p in block.parameters():
            p.grad = torch.randn_like(p)
        opt.step()

    def training_pass():  # the fused op's running-statistics update (fused_resnet::bn_running_update)
        fused = fused_resnet.convert(block, backend="reference", inplace=True).train()
        with torch.no_grad():
            fused(torch.randn(2, 8, 6, 6))
        fused_resnet.revert(fused, inplace=True).eval()

    for change in (edit_weights, edit_running_stats, load_other, optimizer_step, training_pass):
        before = [(w.clone(), t.clone()) for w, t in folded]
        change()
        folded = _fold(block)
        assert _addresses(folded) == addresses, change.__name__
        fresh = _fresh(block, monkeypatch)
        moved = False
        for (w, t), (w0, t0), (wf, tf), (conv, bn) in zip(folded, before, fresh, _units(block)):
            assert torch.equal(w, wf) and torch.equal(t, tf), change.__name__
            w_ref, t_ref = _expected(conv, bn)
            torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
            torch.testing.assert_close(t, t_ref)
            moved |= not (torch.equal(w, w0) and torch.equal(t, t0))
        assert moved, f"{change.__name__} changed nothing the fold reads"


def test_no_refold_while_nothing_changes():
    """An unchanged unit costs no op at all: the refold's writes to the buffers move the buffers' version counters,
    not the sources' the cache compares."""
    block = _block()
    with _Ops() as first:
        folded = _fold(block)
    assert "addcmul" in first.names and "mul" in first.names
    for w, t in folded:  # the buffers' own versions moving must not trigger a refold either
        w.add_(0)
        t.add_(0)
    for _ in range(3):
        with _Ops() as again:
            assert _addresses(_fold(block)) == _addresses(folded)
        assert again.names == []
    with torch.no_grad():
        block.bn1.bias.add_(1.0)
    with _Ops() as changed:
        _fold(block)
    assert changed.names.count("addcmul") == 1  # the changed unit only
    with _Ops() as after:
        _fold(block)
    assert after.names == []


def test_a_converted_module_gets_buffers_of_its_dtype():
    """module.to keeps parameter objects (a new storage under the same identity, the version counter kept) and
    replaces buffers: no entry may hand out folded weights of the old dtype, device or values."""
    block = _block()
    _fold(block)
    block.to(torch.bfloat16)
    for (w, t), (conv, bn) in zip(_fold(block), _units(block)):
        assert w.dtype == torch.bfloat16 and t.dtype == torch.float32
        w_ref, t_ref = _expected(conv, bn)
        torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
        torch.testing.assert_close(t, t_ref)
    # the weight alone converted (same key), then its storage swapped for other values of the same dtype
    conv, bn = block.conv1, block.bn1
    conv.weight.data = conv.weight.data.float()
    w, _ = folding.fold_bn(*_sources(conv, bn), bn.eps)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, _expected(conv, bn)[0], rtol=0, atol=0)
    conv.weight.data = torch.randn_like(conv.weight)
    w, _ = folding.fold_bn(*_sources(conv, bn), bn.eps)
    torch.testing.assert_close(w, _expected(conv, bn)[0], rtol=0, atol=0)


def test_inference_mode():
    """A model run inside inference mode is cached with buffers a later call outside it can refold in place; a
    model built inside inference mode (tensors without version counters) is folded on every call, never cached."""
    block = _block()
    with torch.inference_mode():
        folded = _fold(block)
        assert _addresses(_fold(block)) == _addresses(folded)
    assert not any(w.is_inference() or t.is_inference() for w, t in folded)
    with torch.no_grad():
        block.conv2.weight.mul_(-1.0)
    refolded = _fold(block)
    assert _addresses(refolded) == _addresses(folded)
    torch.testing.assert_close(refolded[1][0], _expected(block.conv2, block.bn2)[0], rtol=0, atol=0)

    with torch.inference_mode():
        frozen = _block(seed=2)
        size = len(folding._FOLD_CACHE)
        first = _fold(frozen)
        assert len(folding._FOLD_CACHE) == size
        frozen.bn1.running_mean.add_(1.0)  # no version counter records this: only a refold every call sees it
        for (w, t), (conv, bn) in zip(_fold(frozen), _units(frozen)):
            w_ref, t_ref = _expected(conv, bn)
            torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
            torch.testing.assert_close(t, t_ref)
        assert not torch.equal(first[0][1], _fold(frozen)[0][1])


def test_the_cache_stays_bounded(monkeypatch):
    """Per-call tensors (a residual scale's γ·α, a 1-D conv's 2-D weight view, replaced parameters) make entries
    that die with them; in-place changes refresh entries instead of adding any."""
    gc.collect()
    others = set(folding._FOLD_CACHE)  # entries of earlier tests' tensors may still die during this one

    def size():
        return len(set(folding._FOLD_CACHE) - others)

    block = _block()
    _fold(block)
    assert size() == 2
    alpha = torch.tensor(0.5)
    for i in range(20):
        with torch.no_grad():
            block.bn1.running_var.add_(0.01)
        _fold(block)
        for conv, bn in _units(block):
            folding.fold_bn(conv.weight, bn.weight * alpha, bn.bias * alpha, bn.running_mean, bn.running_var, bn.eps)
        block.conv2.weight = torch.nn.Parameter(torch.randn_like(block.conv2.weight))
        _fold(block)
        assert size() == 2, i
    one_d = fused_resnet.models.cifar_resnet(8, "B", dim=1, in_channels=1, num_classes=4, width=4,
                                             backend="triton").eval()
    calls = []
    real = folding._fold
    monkeypatch.setattr(folding, "_fold", lambda *a: calls.append(a[0][0].shape) or real(*a))
    with torch.no_grad():
        for _ in range(3):
            one_d(torch.randn(2, 1, 16))
            assert size() == 2
    assert calls and all(len(shape) == 4 and shape[2] == 1 for shape in calls)


def test_capture_records_the_fold_into_the_persistent_buffers(monkeypatch):
    """While a capture is under way every call refolds (what a capture records runs again on each replay), in
    place into the entry an eager call made; the cache's eager state is left as it was."""
    block = _block()
    folded = _fold(block)
    expected = [(w.clone(), t.clone()) for w, t in folded]
    for w, t in folded:  # what an eager call would now hand out unchanged, and a recorded refold overwrites
        w.fill_(float("nan"))
        t.fill_(float("nan"))
    assert all(torch.isnan(w).all() for w, _ in _fold(block))
    with monkeypatch.context() as m:
        _simulate_capture(m)
        for _ in range(2):
            with _Ops() as ops:
                captured = _fold(block)
            assert ops.names.count("addcmul") == 2 and ops.names.count("mul") >= 2
            assert _addresses(captured) == _addresses(folded)
            for (w, t), (w0, t0) in zip(captured, expected):
                assert torch.equal(w, w0) and torch.equal(t, t0)
    with _Ops() as eager:
        assert _addresses(_fold(block)) == _addresses(folded)
    assert eager.names == []


def test_capture_makes_no_entry(monkeypatch):
    """A unit first seen inside a capture folds into the call's own tensors: no cache entry holds a graph pool's
    memory. The next eager call makes the entry."""
    block = _block()
    size = len(folding._FOLD_CACHE)
    with monkeypatch.context() as m:
        _simulate_capture(m)
        captured = _fold(block)
        assert len(folding._FOLD_CACHE) == size
        assert _addresses(_fold(block)) != _addresses(captured)
    for (w, t), (conv, bn) in zip(captured, _units(block)):
        w_ref, t_ref = _expected(conv, bn)
        torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
        torch.testing.assert_close(t, t_ref)
    _fold(block)
    assert len(folding._FOLD_CACHE) == size + 2


def test_triton_eval_under_a_capture_refolds(monkeypatch):
    """Backend triton's eval asks once per block whether a capture is under way and then refolds every unit: a
    poisoned entry (the stale state a replay must not see) is overwritten, and the output matches torch."""
    tv = _block()
    fused = fused_resnet.convert(copy.deepcopy(tv), backend="triton").eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fused(x)
        for w, t in _fold(fused):  # both convs now compute 0: the block would be relu(x)
            w.zero_()
            t.zero_()
        assert torch.equal(fused(x), torch.relu(x))  # the eager path trusts the unchanged sources
        with monkeypatch.context() as m:
            _simulate_capture(m)
            y = fused(x)
        ref64 = copy.deepcopy(tv).double()(x.double())
        c = testing.check("eval under capture", y, ref64, tv(x), ref64, torch.float32)
    assert c.ok, c.row()
