"""The BN vector kernels (kernels/bn_finalize.py) against float64 and against their torch twins — the torch ops
the backend ran before (conv.merge_tile_stats, conv.sum_tile_partials, reference.scale_shift,
bn_finalize.dbn_finalize_reference, reference.bn_running_update). Partial buffers carry NaN rows past the tiles that "ran" (a kernel never writes
them): a finalize that read one would show it."""
import pytest
import torch

from fused_resnet import testing
from fused_resnet.backends import reference

from conftest import GPU

DEVICE = "cuda" if GPU else "cpu"
EPS = 1e-5
PARAM_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rule(name, got, ref64, same):
    c = testing.check(name, got, ref64, same, ref64, torch.float32)
    assert c.ok, c.row()


def _stat_partials(values: torch.Tensor, tile: int, spare_rows: int):
    """Per-tile (mean, M2) partials of values [M, C] as a conv epilogue writes them, in fp32, tiles of ``tile``
    rows, with ``spare_rows`` unwritten (NaN) rows after them, and the 1-element int32 tile size."""
    from fused_resnet.kernels.conv import TilePartials

    m, c = values.shape
    tiles = -(-m // tile)
    means = torch.full((tiles + spare_rows, c), float("nan"), dtype=torch.float32)
    m2s = torch.full_like(means, float("nan"))
    for i in range(tiles):
        chunk = values[i * tile:(i + 1) * tile].double()
        means[i] = chunk.mean(0).float()
        m2s[i] = ((chunk - chunk.mean(0)) ** 2).sum(0).float()
    t = torch.tensor([tile], dtype=torch.int32)
    return TilePartials(means.to(DEVICE), m2s.to(DEVICE), t.to(DEVICE), m)


def _vectors(c, dtype, g):
    gamma = (torch.rand(c, generator=g) + 0.5).to(DEVICE, dtype)
    beta = torch.randn(c, generator=g).to(DEVICE, dtype)
    return gamma, beta


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("m,c,tile", [(1000, 40, 64), (37, 3, 16), (4096, 70, 128)], ids=str)
def test_bn_finalize_merges_tile_partials_and_forms_scale_shift(m, c, tile, param_dtype):
    """Chan's merge of the per-tile (mean, M2) against float64 statistics of the values (|mean| ≫ std: the merge
    must not cancel), with merge_tile_stats as torch's fp32 yardstick; s and t from γ, β in their own dtype
    against scale_shift in float64, with scale_shift in fp32 as the yardstick."""
    from fused_resnet.kernels.bn_finalize import bn_finalize
    from fused_resnet.kernels.conv import merge_tile_stats

    g = torch.Generator().manual_seed(m + c)
    values = torch.randn(m, c, generator=g, dtype=torch.float64) * 0.5 + 20.0 * torch.rand(c, generator=g)
    partials = _stat_partials(values, tile, spare_rows=3)
    gamma, beta = _vectors(c, param_dtype, g)
    mean, var, s, t = bn_finalize(gamma, beta, EPS, partials=partials)
    for v in (mean, var, s, t):
        assert v.dtype == torch.float32 and v.shape == (c,) and v.is_contiguous()
    var64, mean64 = torch.var_mean(values, dim=0, correction=0)
    mean32, var32 = merge_tile_stats(partials)
    _rule("mean", mean, mean64, mean32)
    _rule("var", var, var64, var32)
    s64, t64, _ = reference.scale_shift(gamma.double(), beta.double(), mean64, var64, EPS)
    s32, t32, _ = reference.scale_shift(gamma, beta, mean32, var32, EPS)
    _rule("s", s, s64, s32)
    _rule("t", t, t64, t32)
    # the statistics alone (a process group merges them before s and t exist)
    mean_only, var_only, no_s, no_t = bn_finalize(None, None, EPS, partials=partials)
    assert no_s is None and no_t is None
    assert torch.equal(mean_only, mean) and torch.equal(var_only, var)


@pytest.mark.parametrize("stat_dtype", PARAM_DTYPES, ids=str)
def test_bn_finalize_from_given_statistics(stat_dtype):
    """Running statistics in their own dtype: fp32 copies (not views: the running buffers move afterwards) and s,
    t as scale_shift forms them; stats_out=False returns the given statistics themselves."""
    from fused_resnet.kernels.bn_finalize import bn_finalize

    g = torch.Generator().manual_seed(3)
    c = 45
    run_mean = torch.randn(c, generator=g).to(DEVICE, stat_dtype)
    run_var = (torch.rand(c, generator=g) + 0.1).to(DEVICE, stat_dtype)
    gamma, beta = _vectors(c, stat_dtype, g)
    mean, var, s, t = bn_finalize(gamma, beta, EPS, stats=(run_mean, run_var))
    assert torch.equal(mean, run_mean.float()) and torch.equal(var, run_var.float())
    assert mean.data_ptr() != run_mean.data_ptr()
    s64, t64, _ = reference.scale_shift(gamma.double(), beta.double(), run_mean.double(), run_var.double(), EPS)
    s32, t32, _ = reference.scale_shift(gamma, beta, run_mean.float(), run_var.float(), EPS)
    _rule("s", s, s64, s32)
    _rule("t", t, t64, t32)
    given = (mean, var)
    same_mean, same_var, s2, t2 = bn_finalize(gamma, beta, EPS, stats=given, stats_out=False)
    assert same_mean is mean and same_var is var and torch.equal(s2, s) and torch.equal(t2, t)


def _sum_partials(c, groups, tile, m, g, poison=True):
    """Per-(group, tile) fp32 partial sums of two random float64 [groups, M, C] sets of values, as a dgrad
    epilogue writes them per stride phase (each group's buffer sized for 16-row tiles, the tiles ``tile`` rows),
    and the float64 totals."""
    from fused_resnet.kernels.conv import TilePartials

    rows = -(-m // 16)
    tiles = -(-m // tile)
    dz = torch.randn(groups, m, c, generator=g, dtype=torch.float64) + 0.3
    dzx = torch.randn(groups, m, c, generator=g, dtype=torch.float64) * 2.0
    first = torch.full((groups, rows, c), float("nan") if poison else 0.0, dtype=torch.float32)
    second = first.clone()
    for i in range(tiles):
        first[:, i] = dz[:, i * tile:(i + 1) * tile].sum(1).float()
        second[:, i] = dzx[:, i * tile:(i + 1) * tile].sum(1).float()
    part = TilePartials(first.view(-1, c).to(DEVICE), second.view(-1, c).to(DEVICE),
                        torch.tensor([tile], dtype=torch.int32, device=DEVICE), m, groups)
    return part, dz.sum((0, 1)), dzx.sum((0, 1))


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("counted", ["int", "tensor"])
@pytest.mark.parametrize("c,pc,groups,tile,m", [(40, 24, 4, 64, 300), (16, 64, 1, 16, 1000), (7, 0, 2, 32, 33)],
                         ids=str)
def test_dbn_finalize_sums_partials_into_grads_coefficients_and_the_previous_affine(c, pc, groups, tile, m,
                                                                                     counted, param_dtype):
    """dγ, dβ (in γ's, β's dtype), the dBN coefficients and the previous unit's s, t, rstd in one launch, against
    float64 and against the torch twin in fp32."""
    from fused_resnet.kernels.bn_finalize import dbn_finalize, dbn_finalize_reference

    g = torch.Generator().manual_seed(c + pc)
    part, sum64, sumx64 = _sum_partials(c, groups, tile, m, g)
    gamma, beta = _vectors(c, param_dtype, g)
    var = (torch.rand(c, generator=g) + 0.2).to(DEVICE)
    count_int = groups * m + 5  # e.g. a process group's count: not the partials' row count
    count = torch.tensor(float(count_int), dtype=torch.float64, device=DEVICE) if counted == "tensor" else count_int
    prev = None
    if pc:
        pg, pb = _vectors(pc, param_dtype, g)
        prev = (pg, pb, torch.randn(pc, generator=g).to(DEVICE) * 3.0, (torch.rand(pc, generator=g) + 0.1).to(DEVICE),
                1e-3)
    out = dbn_finalize(part, gamma, beta, var, EPS, count, prev=prev)
    assert out.dgamma.dtype == gamma.dtype and out.dbeta.dtype == beta.dtype and out.sums is None

    twin = dbn_finalize_reference(part, gamma, beta, var, EPS, count, prev=prev)
    rstd64 = torch.rsqrt(var.double() + EPS)
    s64 = gamma.double() * rstd64
    want64 = (s64, -s64 * rstd64 * sumx64 / count_int, -s64 * sum64 / count_int)
    if param_dtype == torch.float32:
        _rule("dgamma", out.dgamma, sumx64, twin.dgamma)
        _rule("dbeta", out.dbeta, sum64, twin.dbeta)
    else:  # one rounding to the parameters' dtype of an fp32 sum: as the twin's
        assert (out.dgamma.double() - twin.dgamma.double()).abs().max() <= (
            torch.finfo(param_dtype).eps * twin.dgamma.double().abs().max())
        assert (out.dbeta.double() - twin.dbeta.double()).abs().max() <= (
            torch.finfo(param_dtype).eps * twin.dbeta.double().abs().max())
    for name, got, w64, w32 in zip(("alpha", "beta", "gamma"), out.coeffs, want64, twin.coeffs, strict=True):
        _rule(name, got, w64, w32)
    if pc:
        pg, pb, pm, pv, peps = prev
        want = reference.scale_shift(pg.double(), pb.double(), pm.double(), pv.double(), peps)
        for name, got, w64, w32 in zip(("s", "t", "rstd"), out.prev, want, twin.prev, strict=True):
            assert got.shape == (pc,)
            _rule(f"previous {name}", got, w64, w32)
    else:
        assert out.prev is None


def test_dbn_finalize_fixed_statistics_sums_out_and_given_sums():
    """Fixed statistics: α = s, β = γ = 0 exactly. A process group's two launches: this rank's sums, rstd and
    dγ, dβ first (no coefficients), then the coefficients from the group's sums."""
    from fused_resnet.kernels.bn_finalize import dbn_finalize

    g = torch.Generator().manual_seed(11)
    c = 33
    part, sum64, sumx64 = _sum_partials(c, 1, 16, 100, g)
    gamma, beta = _vectors(c, torch.float32, g)
    var = (torch.rand(c, generator=g) + 0.2).to(DEVICE)
    fixed = dbn_finalize(part, gamma, beta, var, EPS, 100, batch_stats=False)
    rstd = torch.rsqrt(var + EPS)
    _rule("alpha", fixed.coeffs[0], gamma.double() * torch.rsqrt(var.double() + EPS), gamma * rstd)
    assert not fixed.coeffs[1].any() and not fixed.coeffs[2].any()

    local = dbn_finalize(part, gamma, beta, var, EPS, 100, coeffs=False, sums_out=True)
    assert local.coeffs is None and local.prev is None
    sum_dz, sum_dzx, local_rstd = local.sums
    assert torch.equal(sum_dz, local.dbeta) and torch.equal(sum_dzx, local.dgamma)
    _rule("sum dz", sum_dz, sum64, fixed.dbeta)
    torch.testing.assert_close(local_rstd, rstd, rtol=2e-7, atol=0)
    group = (sum_dz * 2, sum_dzx * 2)  # as if two ranks' sums were all-reduced
    coeffs = dbn_finalize(group, gamma, beta, var, EPS, 200, grads=False).coeffs
    whole = dbn_finalize(part, gamma, beta, var, EPS, 100).coeffs
    for got, want in zip(coeffs, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_finalize_kernels_reject_bad_arguments():
    from fused_resnet.kernels.bn_finalize import bn_finalize, dbn_finalize

    g = torch.Generator().manual_seed(0)
    part, _, _ = _sum_partials(8, 2, 16, 40, g)
    gamma, beta = _vectors(8, torch.float32, g)
    with pytest.raises(ValueError, match="either partials or stats"):
        bn_finalize(gamma, beta, EPS)
    with pytest.raises(ValueError, match="one group"):
        bn_finalize(gamma, beta, EPS, partials=part)
    with pytest.raises(ValueError, match="shape \\(8,\\)"):
        dbn_finalize(part, gamma[:4], beta, gamma, EPS, 10)
    with pytest.raises(ValueError, match="variance in float32"):
        dbn_finalize(part, gamma, beta, gamma.half(), EPS, 10)
    with pytest.raises(ValueError, match="one float64 element"):
        dbn_finalize(part, gamma, beta, gamma, EPS, torch.tensor([1.0, 2.0], device=DEVICE))


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


@pytest.mark.parametrize("c,pc", [(40, 24), (3, 0), (200, 64)], ids=str)
def test_dbn_finalize_reduces_a_wgrad_workspace_in_the_same_launch(c, pc):
    """The previous wgrad's split reduction as more programs of the dBN launch: dW as wgrad_reduce gives it, bit
    for bit, and the dBN outputs as without it."""
    from fused_resnet import launches
    from fused_resnet.kernels import conv
    from fused_resnet.kernels.bn_finalize import dbn_finalize

    g = torch.Generator().manual_seed(c)
    part, _, _ = _sum_partials(c, 2, 16, 50, g)
    gamma, beta = _vectors(c, torch.float16, g)
    var = (torch.rand(c, generator=g) + 0.2).to(DEVICE)
    prev = None
    if pc:
        pg, pb = _vectors(pc, torch.float16, g)
        prev = (pg, pb, torch.randn(pc, generator=g).to(DEVICE), (torch.rand(pc, generator=g) + 0.1).to(DEVICE), EPS)
    ws = torch.randn(4, 6, 3, 2, 32, generator=g).to(DEVICE)  # 6·3·2·24 = 864 outputs: more than one block
    work = conv.WgradWorkspace(ws, 24, torch.float16)
    with launches.recording(dry=False) as seen:
        out = dbn_finalize(part, gamma, beta, var, EPS, 100, prev=prev, reduce=work)
    assert [x.name for x in seen] == ["dbn_finalize_kernel"]
    alone = dbn_finalize(part, gamma, beta, var, EPS, 100, prev=prev)
    assert out.dw.shape == (6, 24, 3, 2) and out.dw.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.dw, conv.wgrad_reduce(work))  # tests/kernels/test_conv.py checks wgrad_reduce
    for got, want in zip((out.dgamma, out.dbeta, *out.coeffs, *(out.prev or ())),
                         (alone.dgamma, alone.dbeta, *alone.coeffs, *(alone.prev or ())), strict=True):
        assert torch.equal(got, want)
