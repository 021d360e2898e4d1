"""The running-statistics update kernel (kernels/bn_finalize.py) against its torch twin, the torch ops the backend
ran before (reference.bn_running_update)."""
import pytest
import torch

from fused_resnet.backends import reference

from conftest import GPU

DEVICE = "cuda" if GPU else "cpu"


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("counted", ["int", "tensor"])
def test_bn_running_update_is_the_references(stat_dtype, momentum, counted):
    """One launch: num_batches_tracked + 1, then torch's update of both running statistics (the unbiased variance
    with count/(count − 1), the cumulative factor 1/num_batches_tracked), as reference.bn_running_update."""
    from fused_resnet.kernels.bn_finalize import bn_running_update

    g = torch.Generator().manual_seed(5)
    c = 300  # more channels than one block of the kernel's loop
    mean = torch.randn(c, generator=g).to(DEVICE)
    var = (torch.rand(c, generator=g) + 0.1).to(DEVICE)
    count = torch.tensor(37.0, dtype=torch.float64, device=DEVICE) if counted == "tensor" else 37
    state = [torch.randn(c, generator=g).to(DEVICE, stat_dtype),
             (torch.rand(c, generator=g) + 0.5).to(DEVICE, stat_dtype), torch.tensor(4, dtype=torch.long, device=DEVICE)]
    want = [t.clone() for t in state]
    before = [t.clone() for t in state]
    for _ in range(2):
        bn_running_update(*state, mean, var, count, momentum)
        reference.bn_running_update(*want, mean, var, count, momentum)
    assert state[2].item() == want[2].item() == 6
    tol = dict(rtol=2e-7, atol=1e-7) if stat_dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(state[0], want[0], **tol)
    torch.testing.assert_close(state[1], want[1], **tol)
    assert not torch.equal(state[0], before[0]) and not torch.equal(state[1], before[1])  # in place


def test_bn_running_update_without_num_batches_tracked():
    from fused_resnet.kernels.bn_finalize import bn_running_update

    mean, var = torch.ones(4, device=DEVICE), torch.full((4,), 2.0, device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    bn_running_update(rm, rv, None, mean, var, 5, 0.5)
    torch.testing.assert_close(rm, torch.full((4,), 0.5, device=DEVICE))
    torch.testing.assert_close(rv, torch.full((4,), 0.5 + 0.5 * 2.0 * 5 / 4, device=DEVICE))
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        bn_running_update(rm, rv, None, mean, var, 5, None)
