"""Dispatch decided once: every module in backends/ is loaded, a backend must implement every method, availability
is probed once per process, resolutions are cached, and a fallback warning names the backend that runs."""
import types
import warnings

import pytest
import torch

from fused_resnet import backends
from fused_resnet.backends import reference, registry
from fused_resnet.spec import BlockSpec, UnitSpec

from conftest import registered

SPEC = BlockSpec((UnitSpec(),))


def test_every_backend_module_registers_itself():
    """One module (or package) per backend; backend cuda registers its unfused twin beside itself."""
    assert backends.names() == ("reference", "cuda", "cuda-unfused", "triton")
    assert backends.choices() == ("auto", "reference", "cuda", "cuda-unfused", "triton")


def test_a_backend_missing_a_method_is_refused_at_registration():
    class Half(registry.Backend):
        name = "half"

        def saved_format(self, x):
            return torch.contiguous_format

        def block_forward(self, spec, x, params, residual):
            return None

    with pytest.raises(TypeError, match="does not implement block_inference, block_backward, bn_running_update"):
        registry.register(Half())
    assert "half" not in backends.names()


class _Counting(reference.ReferenceBackend):
    """The reference math, counting how often the registry asks about it."""

    def __init__(self, name, auto_rank=None, declines=False):
        self.name, self.auto_rank, self.declines = name, auto_rank, declines
        self.probes = self.checks = 0

    def unavailable_reason(self):
        self.probes += 1
        return None

    def unsupported_reason(self, device_type, dtype, spec):
        self.checks += 1
        return "it declines everything" if self.declines else None


def test_availability_is_probed_once_and_again_after_refresh():
    with registered(_Counting("triton")) as backend:
        for _ in range(5):
            backends.available_backends()
            backends.check_requested("triton")
        assert backend.probes == 1
        backends.refresh()
        backends.backend_status()
        assert backend.probes == 2


def test_resolution_is_cached_per_name_device_dtype_and_spec():
    with registered(_Counting("triton")) as backend:
        x = torch.randn(2, 3)
        for _ in range(5):
            assert backends.resolve("triton", x, SPEC) is backend
        assert backend.checks == 1
        backends.resolve("triton", x.double(), SPEC)
        backends.resolve("triton", x, BlockSpec((UnitSpec(groups=2),)))
        assert backend.checks == 3


def test_auto_fallback_warns_once_naming_what_runs():
    """On a CUDA tensor auto tries the backends by rank: a declining first one hands over to the next, and the
    warning names that one (not the reference)."""
    cuda_like = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=torch.float16)
    with registered(_Counting("cuda", auto_rank=0, declines=True)), \
            registered(_Counting("triton", auto_rank=1)) as second:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert backends.resolve("auto", cuda_like, SPEC) is second
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1
        assert "backend 'cuda' does not support this configuration (it declines everything)" in messages[0]
        assert "running it on backend 'triton' instead" in messages[0]


def test_an_explicit_backend_falls_back_to_reference_and_says_so():
    with registered(_Counting("triton", declines=True)):
        with pytest.warns(RuntimeWarning, match="running it on backend 'reference' instead"):
            assert backends.resolve("triton", torch.randn(2), SPEC).name == "reference"


def test_unknown_and_unavailable_backends_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        backends.resolve("fastest", torch.randn(2), SPEC)


class _Declaring(reference.ReferenceBackend):
    def __init__(self, name, auto_rank, **capabilities):
        self.name, self.auto_rank = name, auto_rank
        self.capabilities = registry.Capabilities(**capabilities)


def test_convert_asks_the_capabilities_of_the_backend_auto_picks_on_a_gpu():
    """block_refusal for ``auto``: a block fuses when a backend auto tries on a GPU declares what it needs; the
    reason names each candidate and the capability it lacks."""
    grouped = BlockSpec((UnitSpec(groups=4),))
    with registered(_Declaring("cuda", 0)), registered(_Declaring("triton", 1, groups=True)):
        assert backends.block_refusal("auto", grouped) is None
        assert "backend 'cuda' lacks capability 'groups'" in backends.block_refusal("cuda", grouped)
        assert backends.block_refusal("reference", grouped) is None
    with registered(_Declaring("cuda", 0)), registered(_Declaring("triton", 1)):
        reason = backends.block_refusal("auto", grouped)
        assert "backend 'cuda' lacks capability 'groups'" in reason and "backend 'triton'" in reason


def test_the_running_statistics_update_resolves_on_its_own():
    with registered(_Declaring("triton", None)):
        stats = torch.zeros(3, dtype=torch.float64)
        with pytest.warns(RuntimeWarning, match="capability 'running_update_dtypes'"):
            assert backends.resolve_running_update("triton", stats).name == "reference"
        assert backends.resolve_running_update("triton", stats.float()).name == "triton"
