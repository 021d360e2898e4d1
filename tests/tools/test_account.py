"""The account: fused_resnet.launches, the eager mapping table, the collector, the roofline model and the command."""
import collections
import json
import time

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fused_resnet import launches
from fused_resnet.tools import accounting, cli, kernel_table, roofline
from fused_resnet.tools.accounting import Config


# ---------------------------------------------------------------------------------------------- launches.py
def test_record_is_a_no_op_outside_a_recording():
    launches.record("k", "elementwise", [torch.empty(4)], [torch.empty(4)])
    launches.record_counts("k", "elementwise", 1, 1, 0)
    assert launches.active() is None and not launches.dry()


def test_record_counts_each_distinct_tensor_once():
    x = torch.empty(4, 8, dtype=torch.bfloat16)  # 64 bytes
    v = torch.empty(8, dtype=torch.float32).expand(4, 8)  # stride 0: 8 distinct floats, 32 bytes
    with launches.recording(dry=False) as rec, launches.located("layer1.0"):
        assert launches.active() is rec and not launches.dry()
        launches.record("add", "elementwise", [x, x.t(), x.view(-1), v, None], [x])  # views of the same data
        launches.record("halves", "copy", [x[:2], x[2:]], [x[:2]])  # two views of one storage, different data
        with launches.located("layer1.0.bn1"):
            launches.record_counts("bn", "reduction", 10, 20, 30)
    assert rec == [launches.Launch("add", "elementwise", 64 + 32, 64, 0, "layer1.0"),
                   launches.Launch("halves", "copy", 64, 32, 0, "layer1.0"),
                   launches.Launch("bn", "reduction", 10, 20, 30, "layer1.0.bn1")]
    assert launches.active() is None


def test_recording_is_dry_by_default_does_not_nest_and_checks_kinds():
    with launches.recording() as rec:
        assert launches.dry()
        with pytest.raises(RuntimeError, match="do not nest"):
            with launches.recording():
                pass
        with pytest.raises(ValueError, match="launch kind"):
            launches.record("k", "memcpy", [], [])
    assert rec == []


# ---------------------------------------------------------------------------------------------- hand counts
def _account(model: nn.Module, shape, config: Config) -> accounting.Account:
    with torch.device("meta"):
        model = model()
    model = model.to(torch.bfloat16)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return accounting.account_model(model, shape, config, accounting.provider("eager"))


def _as_counter(acc):
    return collections.Counter((x.name, x.reads, x.writes, x.flops) for x in acc.launches)


# Sizes, bfloat16 unless said: x (4, 3, 8, 8) 1536 B; conv weight (8, 3, 3, 3) 432 B; conv output (4, 8, 8, 8)
# 4096 B; BN's per-channel parameters and running statistics 16 B; its float32 saved mean / invstd 32 B.
# Conv FLOPs: 2 x (4·8·8·8 outputs) x (3·3·3 MACs each) = 110,592.
CONV_FLOPS = 2 * 4 * 8 * 8 * 8 * 27


def test_eval_account_of_conv_bn_relu_pool_fc_matches_a_hand_count():
    """channels_last, bfloat16: no layout transform; ATen's BN in eval: copy of the running mean, invstd, apply."""
    model = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # noqa
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    acc = _account(model, (3, 8, 8), Config(model="tiny", batch=4, mode="eval"))
    expected = collections.Counter([
        ("cudnn conv fprop", 1536 + 432, 4096, CONV_FLOPS),
        ("copy (running mean to saved mean)", 16, 32, 0),
        ("bn invstd", 16, 32, 0),
        ("bn apply", 4096 + 16 + 16 + 32 + 32, 4096, 0),
        ("relu", 4096, 4096, 0),
        ("mean (reduce)", 4096, 4 * 8 * 2, 0),
        ("gemm + bias (cuBLASLt)", 20 + 64 + 160, 80, 2 * 4 * 8 * 10),  # bias, pooled (4, 8), weight (10, 8)
    ])
    assert _as_counter(acc) == expected
    assert [x.where for x in acc.launches] == ["0", "1", "1", "1", "2", "3", "5"]


def test_training_account_of_conv_bn_relu_fc_in_nchw_matches_a_hand_count():
    """NCHW: every cuDNN operand transformed to NHWC and the result back; ATen's NCHW BN kernels (one fused
    backward); loss on float32 logits; the input needs no gradient (no dgrad)."""
    model = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # noqa
                                  nn.Flatten(), nn.Linear(512, 10))
    acc = _account(model, (3, 8, 8), Config(model="tiny", batch=4, channels_last=False, optimizer=False))
    fc_w, fc_flops = 10 * 512 * 2, 2 * 4 * 512 * 10
    expected = collections.Counter([
        # forward
        ("layout transform (input to NHWC)", 1536, 1536, 0),
        ("layout transform (weight to NHWC)", 432, 432, 0),
        ("cudnn conv fprop", 1536 + 432, 4096, CONV_FLOPS),
        ("layout transform (out0 to NCHW)", 4096, 4096, 0),
        ("add (in place)", 8, 8, 0),  # num_batches_tracked += 1 (int64)
        ("bn stats (NCHW)", 4096, 32 + 32, 0),
        ("bn update running stats + invstd", 32 + 32 + 16 + 16, 16 + 16 + 32, 0),
        ("bn apply", 4096 + 16 + 16 + 32 + 32, 4096, 0),
        ("relu", 4096, 4096, 0),
        ("gemm + bias (cuBLASLt)", 20 + 4096 + fc_w, 80, fc_flops),
        # loss on float32 logits: cast, log_softmax, nll_loss (scalar output and total weight)
        ("copy (dtype / layout cast)", 80, 160, 0),
        ("log_softmax", 160, 160, 0),
        ("nll_loss forward", 160 + 4 * 8, 4 + 4, 0),
        # backward
        ("fill (ones_like)", 0, 4, 0),
        ("fill (nll_loss grad zero)", 0, 160, 0),
        ("nll_loss backward", 4 + 32 + 4, 160, 0),
        ("log_softmax backward", 160 + 160, 160, 0),
        ("copy (dtype / layout cast)", 160, 80, 0),
        ("sum (reduce)", 80, 20, 0),  # fc bias gradient
        ("gemm (cuBLAS)", 80 + fc_w, 4096, fc_flops),  # d(input of fc)
        ("gemm (cuBLAS)", 4096 + 80, fc_w, fc_flops),  # d(fc weight)
        ("threshold_backward (relu grad)", 4096 + 4096, 4096, 0),
        ("bn bwd (NCHW, reduce + apply)", 4096 + 4096 + 16 + 32 + 32, 4096 + 16 + 16, 0),
        ("layout transform (grad_output to NHWC)", 4096, 4096, 0),
        ("layout transform (input to NHWC)", 1536, 1536, 0),
        ("cudnn conv wgrad", 4096 + 1536, 432, CONV_FLOPS),
        ("layout transform (out1 to NCHW)", 432, 432, 0),
    ])
    assert _as_counter(acc) == expected


# ---------------------------------------------------------------------------------------------- the mapping table
def test_every_table_row_names_a_known_kind_condition_and_formula():
    call_free = {"train", "eval", "needs_reduction", "bn_bwd_fused", "bn_bwd_split"}
    for op, rows in kernel_table.TABLE.items():
        assert op not in kernel_table.NO_KERNEL
        for row in rows:
            assert row.kind in launches.KINDS, (op, row)
            assert not row.flops or row.flops in kernel_table.FLOPS, (op, row)
            for cond in row.when:
                head = cond.partition(":")[0]
                assert cond in call_free or head in ("mask", "defined", "undefined", "not_nhwc", "bn", "bn_grid",
                                                     "no_bn_grid"), (op, cond)


def test_an_unmapped_op_is_an_error_not_zero():
    x = torch.empty(4, device="meta")
    call = kernel_table.Call(torch.ops.aten.sin.default, (x,), {}, torch.sin(x))
    with pytest.raises(kernel_table.UnmappedOp, match="aten.sin"):
        kernel_table.kernels(call)


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", [{}, {"channels_last": False}, {"amp": True}, {"dtype": "float32"},
                                     {"dtype": "float16", "amp": True}])
def test_the_table_maps_every_op_resnets_dispatch(model, mode, variant):
    acc = accounting.account(Config(model=model, batch=2, size=64, mode=mode, **variant), "eager")
    unknown = {op for op in acc.aten_ops if not kernel_table.is_known(op)}
    assert not unknown
    convs = 20 if model == "resnet18" else 53
    assert sum(x.kind == "conv" for x in acc.launches) == (convs if mode == "eval" else 3 * convs - 1)


def test_bn_grid_is_atens_flexible_launch_config():
    # 256x64x56x56 channels-last: 32x16 threads, 2 column blocks, 3136 row blocks capped at 128
    assert kernel_table.bn_grid(256 * 56 * 56, 64) == (2, 128)
    # 4x8x8x8: 8x16 threads... after widening, 8 columns by 64 rows; one row block
    assert kernel_table.bn_grid(4 * 8 * 8, 8) == (1, 1)
    # fewer than 8 row blocks: no grid-wide reduction
    assert kernel_table.bn_grid(16 * 7 * 7, 2048) == (64, 1)


def test_multi_tensor_apply_chunks_like_aten():
    chunk = kernel_table.CHUNK
    assert kernel_table.multi_tensor_apply_launches([10] * 448, depth=2) == [[(i, 10) for i in range(448)]]
    assert len(kernel_table.multi_tensor_apply_launches([10] * 449, depth=2)) == 2
    big = kernel_table.multi_tensor_apply_launches([chunk * kernel_table.MAX_BLOCKS + 5], depth=1)
    assert big == [[(0, chunk * kernel_table.MAX_BLOCKS)], [(0, 5)]]


# ---------------------------------------------------------------------------------------------- the profiler check
def _composite(name: str) -> bool:
    """Whether every functional overload of aten::<name> decomposes above the dispatch mode (CompositeImplicit)."""
    packet = getattr(torch.ops.aten, name, None)
    found = set()
    for overload in packet.overloads() if packet is not None else ():
        if "out" in overload:  # out= variants: never what a module calls
            continue
        qualified = f"aten::{name}" + ("" if overload == "default" else f".{overload}")
        try:
            found.add(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CompositeImplicitAutograd"))
        except RuntimeError:  # a TorchScript-only overload name
            pass
    return found == {True}


def _profiled_ops(config: Config, provider: str):
    """Run the same step for real on the CPU under torch's profiler; the aten ops the dispatch mode would see,
    in order: events of non-composite aten ops with no such op above them (what one op calls inside itself, the
    profiler records as its children; composite ops are what the mode never sees, only their children)."""
    model, shape = accounting.build(config, accounting.provider(provider))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.normal_(0, 0.05)
        for name, t in model.named_buffers():
            if "running_var" in name:
                t.fill_(1)
            elif "running_mean" in name:
                t.zero_()
    x, y = accounting.inputs(config, shape, "cpu")
    x.normal_()
    opt = accounting.optimizer(model) if config.mode == "train" else None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        accounting.step(config, model, x, y, opt)
    cache = {}

    def counted(event):
        if not event.name.startswith("aten::"):
            return False
        name = event.name[len("aten::"):]
        if name not in cache:
            cache[name] = getattr(torch.ops.aten, name, None) is not None and not _composite(name)
        return cache[name]

    ops = []
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        parent = event.cpu_parent
        while parent is not None and not counted(parent):
            parent = parent.cpu_parent
        if counted(event) and parent is None:
            ops.append(event.name)
    return ops


def _comparable(ops):
    # detach launches nothing, and autograd dispatches extra ones to save in-place results whenever a Python
    # dispatch mode is active: the observation changes its count. add/add_: autograd accumulates a gradient in
    # place when the buffer's reference count allows, which fake tensors raise; one kernel either way.
    return [("aten::add" if op == "aten::add_" else op) for op in ops if op != "aten::detach"]


@pytest.mark.parametrize("config,provider", [
    (Config(model="resnet18", batch=2, size=64, dtype="float32"), "eager"),
    (Config(model="resnet50", batch=2, size=64, amp=True), "eager"),
    (Config(model="resnet18", batch=2, size=64, mode="eval"), "eager"),
    (Config(model="cifar_resnet8", batch=2, dtype="float32", dim=1), "eager"),
    (Config(model="cifar_resnet8", batch=2, dtype="float32"), "reference"),
])
def test_the_dispatch_mode_sees_the_ops_torchs_profiler_records(config, provider):
    """The account's op list (fake tensors, nothing run) equals, op for op and in order, what the profiler
    records when the same step runs for real on the CPU."""
    accounted = _comparable(accounting.account(config, provider).aten_ops)
    profiled = _comparable(_profiled_ops(config, provider))
    assert collections.Counter(accounted) == collections.Counter(profiled)
    assert accounted == profiled


# ---------------------------------------------------------------------------------------------- the collector
def test_every_launch_of_a_resnet18_step_is_located_and_backward_stays_in_its_block():
    acc = accounting.account(Config(model="resnet18", batch=2, size=64), "eager")
    assert all(x.where for x in acc.launches)
    assert acc.blocks == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    for block in acc.blocks:
        mine = [x for x in acc.launches if acc.block_of(x.where) == block]
        convs = 3 if block in ("layer2.0", "layer3.0", "layer4.0") else 2  # with the projection shortcut
        for name in ("cudnn conv fprop", "cudnn conv dgrad", "cudnn conv wgrad"):
            assert sum(x.name == name for x in mine) == convs, (block, name)
    stem = [x for x, u in zip(acc.launches, acc.units) if u == "stem"]
    assert {x.name for x in stem} >= {"cudnn conv fprop", "cudnn conv wgrad", "bn apply", "bn bwd apply"}
    assert "cudnn conv dgrad" not in {x.name for x in stem}  # the image needs no gradient
    assert set(acc.units) == {"stem", "blocks: conv", "blocks: reduction", "blocks: elementwise", "pool", "fc",
                              "loss", "optimizer"}
    total = acc.totals()
    assert sum(t["bytes"] for t in acc.by_block().values()) == total["bytes"]
    assert sum(t["launches"] for t in acc.by_unit().values()) == total["launches"]


def test_the_reference_provider_accounts_the_fused_ops_in_their_blocks():
    config = Config(model="resnet18", batch=2, size=64)
    eager, ref = (accounting.account(config, p) for p in ("eager", "reference"))
    assert ref.totals()["flops"] == eager.totals()["flops"]  # the same convolutions
    assert ref.totals()["bytes"] > eager.totals()["bytes"]  # float32 elementwise steps, recomputed ReLUs
    assert {ref.block_of(x.where) for x in ref.launches} == {"stem", "maxpool", *eager.blocks, "avgpool", "fc",
                                                             "loss", "optimizer"}


# ---------------------------------------------------------------------------------------------- fused providers
FUSED = ("triton", "cuda", "cuda-unfused")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_fused_provider_accounts_the_same_convolutions_from_its_own_launchers(mode):
    """triton, cuda and cuda-unfused run their own block methods on fake tensors: their launchers (Triton's, the
    extension's C++ ops in their dry run) report each kernel; the convolutions' FLOPs are eager's, and the cuDNN
    graphs appear as graph launches on backend cuda only."""
    config = Config(model="resnet18", batch=4, size=64, mode=mode)
    eager = accounting.account(config, "eager")
    accounts = {p: accounting.account(config, p) for p in FUSED}
    for name, acc in accounts.items():
        assert acc.totals()["flops"] == eager.totals()["flops"], name
        assert set(acc.units) >= {"stem", "blocks: conv", "pool", "fc"}, (name, set(acc.units))
    kinds = {p: collections.Counter(x.kind for x in a.launches if a.block_of(x.where) != "loss") for p, a in
             accounts.items()}
    assert kinds["cuda"]["graph"] > 0 and kinds["cuda-unfused"]["graph"] == 0 and kinds["triton"]["graph"] == 0
    assert {x.name for x in accounts["triton"].launches} >= {"conv_fprop_kernel"}
    cuda, unfused = accounts["cuda"].totals(), accounts["cuda-unfused"].totals()
    assert cuda["bytes"] < unfused["bytes"]  # what the graphs fuse: BN-apply passes and statistics reads


def _block_call(backend_name, dtype, device="cpu"):
    """A projection Bottleneck's training forward + backward through backend ``backend_name``'s methods."""
    from fused_resnet import testing
    from fused_resnet.backends import get
    from fused_resnet.spec import Shortcut, from_modules
    from fused_resnet.tensors import Params
    import torchvision

    proj = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    tv = testing.randomize_batchnorm(torchvision.models.resnet.Bottleneck(16, 8, stride=2, downsample=proj),
                                     torch.Generator().manual_seed(0)).to(dtype)
    units = [(tv.conv1, tv.bn1), (tv.conv2, tv.bn2), (tv.conv3, tv.bn3), (proj[0], proj[1])]
    spec = from_modules([c for c, _ in units], [b for _, b in units], Shortcut.PROJECTION)
    params = Params([c.weight.detach() for c, _ in units], [b.weight.detach() for _, b in units],
                    [b.bias.detach() for _, b in units], [None] * 4, [None] * 4)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype).contiguous(
        memory_format=torch.channels_last)
    backend = get(backend_name)

    def step(x, params):
        saved = backend.block_forward(spec, x, params, None)
        backend.block_backward(spec, torch.ones_like(saved.y), x, params, saved, True)
    return step, x, params


def _traffic(recorded):
    return [(x.name, x.kind, x.reads, x.writes, x.flops) for x in recorded]


@pytest.mark.parametrize("backend_name", FUSED)
def test_a_fused_backends_dry_account_is_what_it_launches_on_the_cpu(backend_name):
    """The account cannot drift from the launchers: the same block step recorded while it really runs (Triton's
    interpreter, the extension's CPU path with the graphs' CPU twins) and as a dry run on fake tensors lists the
    same launches, bytes and FLOPs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    from fused_resnet.backends import get

    if get(backend_name).unavailable_reason() is not None:
        pytest.skip(get(backend_name).unavailable_reason())
    step, x, params = _block_call(backend_name, torch.bfloat16)
    with launches.recording(dry=False) as real:
        step(x, params)
    fake_mode = FakeTensorMode()
    fake = tree_map(lambda t: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, (x, params))
    with fake_mode, launches.recording(dry=True) as dry:
        step(*fake)
    assert real and _traffic(dry) == _traffic(real)


# ---------------------------------------------------------------------------------------------- roofline
def test_the_roofline_reproduces_the_calibration_measurement_and_differs_on_the_h200():
    cal = roofline.calibration()
    assert cal.launch_s > 0 and cal.eta_mem == pytest.approx(3000 / 3350) and cal.eta_flop == pytest.approx(377 / 989)
    eager = accounting.account(roofline.CALIBRATION, "eager")
    h100 = roofline.predict(eager, roofline.GPUS["h100"], cal)["img_per_s"]
    h200 = roofline.predict(eager, roofline.GPUS["h200"], cal)["img_per_s"]
    assert h100 == pytest.approx(3951, rel=1e-9)
    assert h200 > h100 * 1.05


def test_the_roofline_refuses_a_measurement_faster_than_its_own_floor():
    eager = accounting.account(Config(model="resnet18", batch=2, size=64), "eager")
    with pytest.raises(ValueError, match="exceeds the measured step"):
        roofline.fit(eager, 1e12, roofline.GPUS["h100"])


# ---------------------------------------------------------------------------------------------- the command
def test_the_command_accounts_resnet18_in_seconds(tmp_path, capsys):
    start = time.perf_counter()
    assert cli.main(["account", "--model", "resnet18", "--mode", "train,eval", "--json", str(tmp_path / "a.json"),
                     "--chart", str(tmp_path / "a.png"), "--blocks"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "| eager | resnet18 | train |" in out and "| reference | resnet18 | eval |" in out
    assert "| layer4.1 |" in out
    data = json.loads((tmp_path / "a.json").read_text())
    assert [a["provider"] for a in data["accounts"]] == ["eager", "eager", "reference", "reference"]
    first = data["accounts"][0]
    assert first["totals"]["launches"] == len(first["launches"]) and set(first["predicted"]) == {"h100", "h200"}
    assert (tmp_path / "a.png").stat().st_size > 0
    assert elapsed < 60  # a loaded 2-core machine; about 5 s unloaded, the ResNet-50 calibration included


def test_the_command_names_a_provider_it_does_not_know():
    with pytest.raises(SystemExit, match="fused-resnet account: unknown provider 'cudnn'"):
        cli.main(["account", "--model", "resnet18", "--providers", "eager,cudnn"])
