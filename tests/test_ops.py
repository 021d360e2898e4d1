"""The torch.library op layer: opcheck on every op, torch.compile(fullgraph=True) and torch.export of converted
models."""
import copy
import dataclasses

import pytest
import torch

from fused_resnet import models, ops
from fused_resnet.spec import Shortcut
from fused_resnet.tensors import Params

from conftest import DEVICES, GRADCHECK_CASES, block_problem, op_args


def _forward_samples(device, dtype):
    for shortcut, units, batch_stats, groups, dilation in GRADCHECK_CASES:
        a = block_problem(shortcut, units, batch_stats, groups, dilation)
        for k in ("x", "residual"):
            if a[k] is not None:
                a[k] = a[k].detach().to(device, dtype).requires_grad_()
        for k in ("weights", "gammas", "betas"):
            a[k] = [t.detach().to(device, dtype if k == "weights" else torch.float32).requires_grad_() for t in a[k]]
        for k in ("running_means", "running_vars"):
            a[k] = [t.to(device, torch.float32) for t in a[k]]
        yield a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_block_forward_and_backward(device, dtype):
    for a in _forward_samples(device, dtype):
        args = op_args(a)
        torch.library.opcheck(ops.block_forward, args)
        out = ops.block_forward(*args)
        n = len(a["weights"])
        bwd_args = (torch.randn_like(out[0]), a["x"].detach(), out[0].detach(),
                    [w.detach() for w in a["weights"]], [g.detach() for g in a["gammas"]],
                    [b.detach() for b in a["betas"]], [t.detach() for t in out[1:1 + n]],
                    [t.detach() for t in out[1 + n:1 + 2 * n]], [t.detach() for t in out[1 + 2 * n:]],
                    a["spec"].ints, a["spec"].floats, True, "reference")
        torch.library.opcheck(ops.block_backward, bwd_args)
        torch.library.opcheck(ops.block_backward, bwd_args[:-2] + (False, "reference"))
        if a["spec"].final_relu:  # stochastic depth (an open block has no closing to put it in): the per-sample
            # scale through the schema, the fake and autograd, sample 0 dropped
            scale = torch.full((a["x"].shape[0],), 1.25, dtype=dtype, device=device)
            scale[0] = 0.0
            torch.library.opcheck(ops.block_forward, op_args(a, sample_scale=scale))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_block_inference_and_running_update(device):
    for a in _forward_samples(device, torch.float32):
        if a["spec"].shortcut == Shortcut.TENSOR:
            a["residual"] = a["residual"].detach()
        a["spec"] = a["spec"].with_batch_stats([False] * len(a["spec"].units))
        for k in ("x", "weights", "gammas", "betas"):
            a[k] = a[k].detach() if k == "x" else [t.detach() for t in a[k]]
        torch.library.opcheck(ops.block_inference, op_args(a)[:-1])  # eval: no stochastic depth
    for momentum in (0.1, None):
        args = (torch.randn(5, device=device), torch.rand(5, device=device) + 0.5,
                torch.tensor(3, device=device), torch.randn(5, device=device), torch.rand(5, device=device), 12,
                momentum, "reference")
        torch.library.opcheck(ops.bn_running_update, args)


@pytest.mark.parametrize("build,shape", [
    (lambda: models.resnet18(num_classes=10, backend="reference"), (4, 3, 32, 32)),
    (lambda: models.cifar_resnet(20, shortcut="A", backend="reference"), (4, 3, 32, 32)),
    (lambda: models.cifar_resnet(20, shortcut="B", dim=1, in_channels=1, backend="reference"), (4, 1, 40)),
], ids=["resnet18", "cifar20-A", "cifar20-B-1d"])
def test_compile_fullgraph_matches_eager(build, shape):
    """torch.compile(fullgraph=True) traces a converted model with no graph break; a train step and an eval
    forward give the eager results and the same running statistics. The specs are built inside the compiled code
    (the stem's on its first call, every block's again after eval() and train()), and the ones it leaves on the
    modules serve the uncompiled model."""
    torch._dynamo.reset()
    model = build()
    x = torch.randn(*shape)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out_c = compiled(x)
    out_e = eager(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_c.sum().backward()
    out_e.sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)
    model.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)
    model.train(), eager.train()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)


def test_compile_dynamic_shapes_matches_eager():
    """dynamic=True: batch and image sizes are symbols (the specs hold none: a shape never enters a spec); two
    input sizes give eager's numbers and running statistics in training and in eval."""
    torch._dynamo.reset()
    model = models.cifar_resnet(8, shortcut="B", num_classes=4, width=4, backend="reference")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(eager, mode)()
        for shape in ((4, 3, 16, 16), (6, 3, 12, 20)):
            x = torch.randn(*shape)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_export_keeps_the_fused_ops_and_running_statistics(mode):
    """torch.export of a converted model: the graph calls the fused ops (nothing falls back to the block's own
    modules), and the exported module, after run_decompositions as well, gives eager's output and running
    statistics (training: every BN buffer is a mutated output of the graph)."""
    model = getattr(models.cifar_resnet(8, shortcut="A", num_classes=4, width=4, backend="reference"), mode)()
    x = torch.randn(4, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    decomposed = exported.run_decompositions()
    targets = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert "fused_resnet.block_forward.default" in targets and not any("batch_norm" in t for t in targets)
    n_buffers = len(list(model.buffers()))
    assert len(decomposed.graph_signature.buffers_to_mutate) == (n_buffers if mode == "train" else 0)
    for program in (exported, decomposed):
        eager, run = copy.deepcopy(model), program.module()
        torch.testing.assert_close(run(x), eager(x), rtol=1e-5, atol=1e-5)
        buffers = dict(run.named_buffers())
        for name, b in eager.named_buffers():
            torch.testing.assert_close(buffers[name], b, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_op_pins_a_symbolic_spec():
    """A spec that enters a compiled frame as an input (code calling the op layer itself, or a graph break between
    a block's spec and its op) reaches the fakes as SymInts / SymFloats under dynamic=True, as it does under
    automatic dynamic once it changes between calls: the op layer pins it to its values, so each spec gets its
    own guarded graph and none runs another's configuration."""
    torch._dynamo.reset()

    def run(spec, x, params):
        return ops.inference(spec, x, params, None, "reference")

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True, dynamic=True)
    a = block_problem(Shortcut.IDENTITY, 2, False)
    x = a["x"].detach()
    params = Params(*([t.detach() for t in a[k]] for k in ("weights", "gammas", "betas", "running_means",
                                                            "running_vars")))
    base = a["spec"]
    variants = [base, dataclasses.replace(base, shortcut=Shortcut.NONE),
                dataclasses.replace(base, units=(dataclasses.replace(base.units[0], eps=5.0),) + base.units[1:])]
    for spec in variants:
        torch.testing.assert_close(compiled(spec, x, params), run(spec, x, params), msg=str(spec))
