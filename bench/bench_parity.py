"""Training parity: the loss after N SGD steps on fixed synthetic data, a converted model against eager PyTorch.

Both start from the same weights, see the same batch every step (a fixed synthetic batch with learnable labels:
a fixed random linear map of the input) and take the same SGD steps (lr 0.01, momentum 0.9). Reported: the loss
curve of each provider and the relative difference of the final loss (the target is within 1 % of eager in
the same dtype). Run on a GPU in bf16 (or under TRITON_INTERPRET=1 on a CPU as a smoke test):

    python bench/bench_parity.py --model resnet50 --dtype bfloat16 --batch 64 --steps 200 --out parity.json
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from fused_resnet import testing
from fused_resnet.tools import benchmark


def train_losses(base, provider: str, x, y, steps: int) -> list:
    model = benchmark.provider_model(base, provider).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=None, help="input image size (default: the model's)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--providers", default="cuda,triton", help="fused backends compared with eager")
    parser.add_argument("--tolerance", type=float, default=0.01, help="allowed relative final-loss difference")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dev = benchmark.bench_device("bench_parity")
    if dev is None:
        return 2
    fmt = torch.channels_last
    base, x, _ = benchmark.model_inputs(args.model, args.batch, dev, testing.DTYPES[args.dtype], fmt, args.size)
    classes = 1000 if args.model.startswith("resnet") else 10
    proj = torch.randn(x[0].numel(), classes, generator=torch.Generator().manual_seed(1)).to(dev)
    y = (x.float().flatten(1) @ proj).argmax(1)  # learnable labels: a fixed linear map of the input
    curves = {p: train_losses(base, p, x, y, args.steps) for p in ["eager"] + args.providers.split(",")}
    final = curves["eager"][-1]
    rows = []
    for provider, losses in curves.items():
        rel = abs(losses[-1] - final) / abs(final)
        rows.append({"provider": provider, "final_loss": losses[-1], "rel_diff_vs_eager": rel,
                     "ok": rel <= args.tolerance or provider == "eager", "losses": losses})
        print(f"{provider:<10} loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps; "
              f"vs eager {100 * rel:.2f}% ({'ok' if rows[-1]['ok'] else 'OVER'} the {100 * args.tolerance:g}% target)")
    result = {"benchmark": "parity", "model": args.model, "dtype": args.dtype, "batch": args.batch,
              "steps": args.steps, **benchmark.environment(), "rows": rows}
    return benchmark.finish(result, args.out, all(r["ok"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
