"""Host-side cost of one fused block call: tiny tensors, so the time is the Python / dispatcher work around the
math, not the math. Beside it, torchvision's eager block on the same tensors, in the same run.

Rows (median µs per call, warm-up excluded; CPU tensors unless --device cuda):
  * ``block eval``        — a block in eval mode under no_grad (the inference op);
  * ``block train fwd``   — train mode forward (the training op, then the running-statistics update);
  * ``block train f+b``   — train mode forward and backward;
  * ``op layer``          — ``fused_resnet::block_inference`` called directly with a prepared spec, minus the backend's
    own block_inference called directly with the same arguments: what the torch.library layer and dispatch add;
  * ``guard check``       — the per-call check that the block's submodules are still the ones it fused
    (fused_resnet.guard), alone;
  * ``spec check``        — the per-call lookup of the block's BlockSpec (rebuilt only when a setting changed), alone.

    python bench/bench_host_overhead.py --out host_overhead.json
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torchvision

import fused_resnet
from fused_resnet.tools import benchmark


def _medians_us(fns: dict, reps: int, rounds: int = 20) -> dict:
    """Median µs per call of each function, warm-up excluded; the functions take turns in ``rounds`` rounds so
    that a slow phase of the machine falls on all of them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(max(10, reps // 10)):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(1, reps // rounds)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def _block_calls(block: torch.nn.Module, x: torch.Tensor):
    """Eval forward, train forward and train forward+backward, each on its own copy of the block (set to its mode
    once, as in a real run)."""
    evaluated, trained, stepped = (copy.deepcopy(block) for _ in range(3))
    evaluated.eval()
    xg = x.clone().requires_grad_(True)

    def eval_call():
        with torch.no_grad():
            evaluated(x)

    return {"block eval": eval_call, "block train fwd": lambda: trained(x),
            "block train f+b": lambda: stepped(xg).sum().backward()}


def _op_layer_calls(block: torch.nn.Module, x: torch.Tensor, backend: str):
    """(the eval op called through torch.library, the backend's method called directly), same arguments."""
    from fused_resnet import backends, ops
    from fused_resnet.tensors import Params

    block = copy.deepcopy(block).eval()
    convs, bns, *_ = block._structure()
    spec = block.block_spec()
    params = Params([c.weight for c in convs], [b.weight for b in bns], [b.bias for b in bns],
                    [b.running_mean for b in bns], [b.running_var for b in bns])
    impl = backends.resolve(backend, x, spec)

    def through_op():
        with torch.no_grad():
            ops.inference(spec, x, params, None, backend)

    def direct():
        with torch.no_grad():
            impl.block_inference(spec, x, params, None)

    return through_op, direct


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    c = args.channels
    x = torch.randn(2, c, args.size, args.size, device=dev)
    eager = torchvision.models.resnet.BasicBlock(c, c).to(dev)
    fused = fused_resnet.convert(eager, backend=args.backend)
    fns = {(name, "eager"): fn for name, fn in _block_calls(eager, x).items()}
    fns.update({(name, args.backend): fn for name, fn in _block_calls(fused, x).items()})
    through_op, direct = _op_layer_calls(fused, x, args.backend)
    fns.update({("op", "through"): through_op, ("op", "direct"): direct})
    fns.update({("guard check", args.backend): fused._eager_reason, ("spec check", args.backend): fused.block_spec})
    us = _medians_us(fns, args.reps)
    rows = [{"row": name, "provider": provider, "us": t} for (name, provider), t in us.items() if name != "op"]
    rows.append({"row": "op layer", "provider": args.backend, "us": us[("op", "through")] - us[("op", "direct")],
                 "op_us": us[("op", "through")], "backend_us": us[("op", "direct")]})
    print(f"{'row':<18} {'provider':<10} {'µs/call':>9}   (block {c}x{args.size}x{args.size}, batch 2, {dev})")
    for r in rows:
        print(f"{r['row']:<18} {r['provider']:<10} {r['us']:9.1f}")
    return benchmark.finish({"rows": rows, **benchmark.environment()}, args.out, True)


if __name__ == "__main__":
    sys.exit(main())
