"""Synchronised BatchNorm on the fused ops over torch.distributed: 2 processes, the gloo backend, on the CPU.

A 2-rank run on parts of a batch (different sizes, or one rank empty) must give what one process gives on the
whole batch: outputs, the input gradient, every parameter gradient (summed over ranks, as DistributedDataParallel
does before averaging) and the running statistics, for identity, projection and option-A blocks: the reference
backend in float64 (to 1e-10); in float32 the reference backend, the Triton kernels (interpreter) and the
extension's block ops (their CPU registrations), with the float64-oracle rule. Then data-parallel SGD steps: with
synchronised BN the whole-batch steps of one process; with per-rank BN under DDP, DDP of the unconverted model.
On a GPU: NCCL, one rank per GPU.

Every scenario runs inside one pair of spawned processes (starting them costs seconds); the tests read their
results."""
import datetime
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_resnet
from fused_resnet import testing

from conftest import requires_gpu

WORLD = 2
# A collective that finds no partner (a mismatch between ranks) fails after this, rather than hanging the suite.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
# name → (block kind, inplanes, planes, stride, shortcut)
BLOCKS = {
    "identity": ("basic", 8, 8, 1, None),
    "projection": ("bottleneck", 8, 4, 2, "B"),
    "option_a": ("basic", 8, 16, 2, "A"),
}
# (block, backend, dtype, batch split over the ranks)
CASES = [(b, "reference", torch.float64, (4, 2)) for b in BLOCKS] + [
    ("projection", "reference", torch.float64, (6, 0)),
    ("identity", "reference", torch.float32, (3, 3)),
    ("projection", "triton", torch.float32, (4, 2)),
    ("option_a", "triton", torch.float32, (2, 4)),
    ("projection", "cuda", torch.float32, (4, 2)),  # the extension's CPU registrations (conftest)
    ("identity", "cuda", torch.float32, (1, 5)),
    ("option_a", "cuda", torch.float32, (3, 3)),
]


def case_id(case) -> str:
    block, backend, dtype, split = case
    return f"{block}-{backend}-{str(dtype)[6:]}-{split[0]}+{split[1]}"


def _block(name: str) -> nn.Module:
    kind, inplanes, planes, stride, shortcut = BLOCKS[name]
    out = planes * (1 if kind == "basic" else 4)
    torch.manual_seed(0)
    downsample = None
    if shortcut == "A":
        downsample = fused_resnet.ShortcutA(stride, out)
    elif shortcut == "B":
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    cls = fused_resnet.EagerBasicBlock if kind == "basic" else fused_resnet.EagerBottleneck
    block = cls(inplanes, planes, stride, downsample)
    testing.randomize_batchnorm(block, torch.Generator().manual_seed(1))
    return block


def _inputs(name: str, n: int = 6):
    g = torch.Generator().manual_seed(2)
    inplanes = BLOCKS[name][1]
    x = torch.randn(n, inplanes, 6, 6, generator=g, dtype=torch.float64)
    return x, g


def _run(model: nn.Module, x: torch.Tensor, grad_out_of) -> dict:
    """One training forward + backward of ``model`` on x (loss Σ y·g): output, input grad, parameter grads and
    the buffers after it."""
    x = x.clone().requires_grad_(True)
    model.train()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(grad_out_of(y))
    return {"y": y.detach(), "dx": x.grad, "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}


def _rank_slice(split, rank):
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _scenario_blocks(rank: int) -> dict:
    out = {}
    for case in CASES:
        name, backend, dtype, split = case
        x, g = _inputs(name)
        fused = fused_resnet.convert(_block(name), backend=backend, sync_bn=True).to(dtype)
        part = x[_rank_slice(split, rank)].to(dtype)
        # the same upstream gradient as the whole-batch run: a random tensor of the whole output's shape, sliced
        res = _run(fused, part, lambda y: _whole_grad(y, g, split)[_rank_slice(split, rank)].to(y.dtype))
        for grad in res["grads"].values():
            dist.all_reduce(grad)  # what DDP does (before dividing by the world size)
        out[case_id(case)] = res
    return out


def _whole_grad(y_part: torch.Tensor, g: torch.Generator, split) -> torch.Tensor:
    shape = (sum(split),) + tuple(y_part.shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _resnet(sync: bool):
    torch.manual_seed(0)
    model = fused_resnet.models.cifar_resnet(8, "B", num_classes=4, width=4, backend=None).double()
    testing.randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model


def _scenario_ddp(rank: int) -> dict:
    """Three SGD steps under DDP on half batches: the converted model with synchronised BN, the converted model
    with per-rank BN, and the unconverted model with per-rank BN (torch's own, the reference for the second)."""
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g))
            for _ in range(3)]
    out = {}
    for key, make in (("sync", lambda m: fused_resnet.convert(m, backend="reference", sync_bn=True)),
                      ("fused", lambda m: fused_resnet.convert(m, backend="reference")),
                      ("eager", lambda m: m)):
        module = make(_resnet(key == "sync"))
        # torch's DDP takes SyncBatchNorm only in GPU modules: on the CPU, its gradient averaging by hand
        model = module if key == "sync" else nn.parallel.DistributedDataParallel(module)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in data:
            half = slice(4 * rank, 4 * rank + 4)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[half]), y[half]).backward()
            if key == "sync":
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            opt.step()
        out[key] = {n: t.detach().clone() for n, t in module.state_dict().items()}
    out["data"] = data
    return out


def _scenario_own_groups(rank: int) -> dict:
    """A model holding nn.SyncBatchNorm layers with a process group of its own, converted without sync_bn: the
    groups are kept. Also counts the collectives of one forward + backward of a projection bottleneck (4 BNs)."""
    group = dist.new_group([0, 1])
    name, split = "projection", (2, 4)
    x, g = _inputs(name)
    block = fused_resnet.convert(nn.SyncBatchNorm.convert_sync_batchnorm(_block(name), group),
                                 backend="reference").double()
    calls = {"all_gather": 0, "all_reduce": 0}
    real = {k: getattr(dist, k) for k in calls}

    def counting(kind):
        def call(*args, **kwargs):
            calls[kind] += 1
            return real[kind](*args, **kwargs)
        return call

    for kind in calls:
        setattr(dist, kind, counting(kind))
    try:
        res = _run(block, x[_rank_slice(split, rank)], lambda y: _whole_grad(y, g, split)[_rank_slice(split, rank)])
    finally:
        for kind, fn in real.items():
            setattr(dist, kind, fn)
    for grad in res["grads"].values():
        dist.all_reduce(grad)
    return {"result": res, "calls": calls, "same_group": block.bn1.process_group is group,
            "split": split}


def _scenario_host_reads(rank: int) -> dict:
    """The ops that read a tensor's value on the host during a synchronised block's training step (forward,
    backward, running statistics), per backend: none may (a CUDA graph could not capture them)."""
    from test_graphs import _HostReads

    out = {}
    for backend in ("reference", "triton", "cuda"):
        block = fused_resnet.convert(_block("projection"), backend=backend, sync_bn=True).float()
        x = _inputs("projection")[0][3 * rank: 3 * rank + 3].float()
        _run(block, x, torch.ones_like)  # first step outside: caches
        with _HostReads() as reads:
            _run(block, x, torch.ones_like)
        out[backend] = reads.calls
    return out


def _worker(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        torch.save({"blocks": _scenario_blocks(rank), "ddp": _scenario_ddp(rank), "groups": _scenario_own_groups(rank),
                    "host_reads": _scenario_host_reads(rank)}, os.path.join(path, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(path, f"{r}.pt"), weights_only=False) for r in range(WORLD)]


def _whole(name: str, dtype: torch.dtype, split):
    """One process, the whole batch, plain BatchNorm: in ``dtype`` and in float64."""
    x, g = _inputs(name, sum(split))
    runs = {}
    for d in {dtype, torch.float64}:
        runs[d] = _run(_block(name).to(d), x.to(d), lambda y: _whole_grad(y, g, split).to(y.dtype))
    return runs[dtype], runs[torch.float64]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_synced_block_equals_whole_batch(ranks, case):
    name, backend, dtype, split = case
    parts = [r["blocks"][case_id(case)] for r in ranks]
    same, ref = _whole(name, dtype, split)
    fused = {"y": torch.cat([p["y"] for p in parts]), "dx": torch.cat([p["dx"] for p in parts])}
    checks = [testing.check(k, fused[k], ref[k], same[k], ref[k], dtype) for k in ("y", "dx")]
    for rank, part in enumerate(parts):
        assert set(part["grads"]) == set(ref["grads"])
        checks += [testing.check(f"rank {rank} grad {n}", part["grads"][n], ref["grads"][n], same["grads"][n],
                                 ref["grads"][n], dtype) for n in ref["grads"]]
        for n, b in ref["buffers"].items():
            if n.endswith("num_batches_tracked"):
                assert torch.equal(part["buffers"][n], b), n
            else:
                checks.append(testing.check(f"rank {rank} {n}", part["buffers"][n], b, same["buffers"][n], b, dtype))
    bad = [c.row() for c in checks if not c.ok]
    assert not bad, "\n".join([testing.TABLE_HEADER] + bad)


def test_a_models_own_sync_bn_groups_are_kept_with_one_collective_per_bn_and_direction(ranks):
    same, ref = _whole("projection", torch.float64, ranks[0]["groups"]["split"])
    for rank, r in enumerate(ranks):
        part = r["groups"]
        assert part["same_group"]
        assert part["calls"] == {"all_gather": 4, "all_reduce": 4}  # 3 main BNs + the projection's: one each way
        sl = _rank_slice(part["split"], rank)
        torch.testing.assert_close(part["result"]["y"], ref["y"][sl], rtol=1e-10, atol=1e-10)
        for n, grad in ref["grads"].items():
            torch.testing.assert_close(part["result"]["grads"][n], grad, rtol=1e-10, atol=1e-10, msg=n)


def test_synchronised_step_reads_nothing_on_the_host(ranks):
    """The group's count stays on the device through the running statistics and the backward, on every backend."""
    for r in ranks:
        assert r["host_reads"] == {"reference": [], "triton": [], "cuda": []}


def test_data_parallel_sync_bn_equals_whole_batch(ranks):
    """Averaging the two ranks' gradients of their half-batch mean losses (DDP's step) with synchronised BN is the
    whole-batch step of one process."""
    model = _resnet(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in ranks[0]["ddp"]["data"]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for r in ranks:
        for n, t in model.state_dict().items():
            torch.testing.assert_close(r["ddp"]["sync"][n], t, rtol=1e-10, atol=1e-10, msg=n)


def test_ddp_converted_equals_ddp_unconverted(ranks):
    for r in ranks:
        for n, t in r["ddp"]["eager"].items():
            torch.testing.assert_close(r["ddp"]["fused"][n], t, rtol=1e-10, atol=1e-10, msg=n)


def test_sync_spec_only_where_torch_synchronises():
    """Without an initialised process group (or in eval) a SyncBatchNorm is a plain BN, as in torch."""
    block = fused_resnet.convert(_block("identity"), backend="reference", sync_bn=True)
    assert isinstance(block.bn1, nn.SyncBatchNorm)
    assert not block.block_spec().synced
    reverted = fused_resnet.revert(block)
    assert isinstance(reverted.bn1, nn.SyncBatchNorm)


def _gpu_worker(rank: int, world: int, port: int, path: str) -> None:
    """One rank per GPU on NCCL: each rank its share of the batch through fused blocks with synchronised BN (the
    extension's and the Triton kernels), gathered on rank 0 against the whole batch."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        out = {}
        split = tuple(range(2, 2 + world))  # different batch sizes per rank
        for backend in ("cuda", "triton"):
            name = "projection"
            x, g = _inputs(name, sum(split))
            fused = fused_resnet.convert(_block(name), backend=backend, sync_bn=True).cuda().float()
            assert fused.block_spec().synced == (world > 1)
            part = x[_rank_slice(split, rank)].float().cuda()
            res = _run(fused, part, lambda y: _whole_grad(y, g, split)[_rank_slice(split, rank)].to(y))
            for grad in res["grads"].values():
                dist.all_reduce(grad)
            out[backend] = {"y": res["y"].cpu(), "grads": {k: v.cpu() for k, v in res["grads"].items()},
                            "split": split}
        torch.save(out, os.path.join(path, f"gpu{rank}.pt"))
    finally:
        dist.destroy_process_group()


@requires_gpu
def test_nccl_synced_blocks_equal_whole_batch():
    """NCCL with one rank per GPU (a single-rank smoke test on a one-GPU machine: torch synchronises nothing
    there, and neither does the fused block)."""
    world = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(_gpu_worker, args=(world, _free_port(), path), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(path, f"gpu{r}.pt"), weights_only=False) for r in range(world)]
    checks = []
    for rank, results in enumerate(ranks):
        for backend, res in results.items():
            same, ref = _whole("projection", torch.float32, res["split"])
            part = _rank_slice(res["split"], rank)
            checks.append(testing.check(f"rank {rank} {backend} y", res["y"], ref["y"][part], same["y"][part],
                                        ref["y"][part], torch.float32))
            checks += [testing.check(f"rank {rank} {backend} grad {n}", res["grads"][n], ref["grads"][n],
                                     same["grads"][n], ref["grads"][n], torch.float32) for n in ref["grads"]]
    bad = [c.row() for c in checks if not c.ok]
    assert not bad, "\n".join([testing.TABLE_HEADER] + bad)
