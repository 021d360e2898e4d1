"""The fused-resnet command line."""
import pytest

from fused_resnet import backends, cli, reference


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "backends:", "reference", "extension"):
        assert word in out


@pytest.mark.parametrize("args", [["--model", "cifar_resnet20"],
                                  ["--model", "cifar_resnet20", "--dim", "1", "--shortcut", "B"],
                                  ["--model", "cifar_resnet20", "--dtype", "float16", "--channels-last"],
                                  ["--model", "resnet18", "--size", "32", "--dtype", "float64"]])
def test_verify_passes(args, capsys):
    assert cli.main(["verify", "--device", "cpu"] + args) == 0
    assert "all checks passed" in capsys.readouterr().out


class _SlightlyWrongBackend(backends.Backend):
    """Reference math with the BN shift of every unit off by 1e-3: verify must catch it."""

    name = "cuda"

    @staticmethod
    def block_forward(x, weights, gammas, betas, *rest):
        return reference.block_forward(x, weights, gammas, [b + 1e-3 for b in betas], *rest)

    @staticmethod
    def block_inference(x, weights, gammas, betas, *rest):
        return reference.block_inference(x, weights, gammas, [b + 1e-3 for b in betas], *rest)


def test_verify_fails_on_a_wrong_backend(capsys):
    saved = dict(backends._REGISTRY)
    backends.register(_SlightlyWrongBackend())
    try:
        assert cli.main(["verify", "--device", "cpu", "--model", "cifar_resnet20", "--backend", "cuda"]) == 1
    finally:
        backends._REGISTRY.clear()
        backends._REGISTRY.update(saved)
    assert "FAILED" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["verify", "--model", "vgg16"])
