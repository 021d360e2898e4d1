"""The fused-resnet command line."""
import pytest
import torch

from fused_resnet import backends
from fused_resnet.backends import reference
from fused_resnet.tools import cli

from conftest import registered


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "backends:", "reference", "extension"):
        assert word in out


@pytest.mark.parametrize("args", [["--model", "cifar_resnet20"],
                                  ["--model", "cifar_resnet20", "--dim", "1", "--shortcut", "B"],
                                  ["--model", "cifar_resnet20", "--dtype", "float16", "--channels-last"],
                                  ["--model", "resnet18", "--size", "32", "--dtype", "float64"],
                                  ["--model", "cifar_resnet20", "--random-bn"]])
def test_verify_passes(args, capsys):
    assert cli.main(["verify", "--device", "cpu"] + args) == 0
    assert "all checks passed" in capsys.readouterr().out


class _SlightlyWrongBackend(reference.ReferenceBackend):
    """Reference math with the BN shift of every unit off by 1e-3: verify must catch it."""

    name = "cuda"

    def block_forward(self, spec, x, params, residual):
        return reference.block_forward(spec, x, params._replace(betas=[b + 1e-3 for b in params.betas]), residual)

    def block_inference(self, spec, x, params, residual):
        return reference.block_inference(spec, x, params._replace(betas=[b + 1e-3 for b in params.betas]), residual)


def test_verify_fails_on_a_wrong_backend(capsys):
    with registered(_SlightlyWrongBackend()):
        assert cli.main(["verify", "--device", "cpu", "--model", "cifar_resnet20", "--backend", "cuda"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["verify", "--model", "vgg16"])


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch", "1"], "--batch must be at least 2"),
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--device", "tpu9"], "--device"),
    (["--backend", "triton"], "backend 'triton' is not available here"),
])
def test_verify_user_errors_are_one_line(args, message, monkeypatch):
    """A user error is one line naming the command and exit status 2 (SystemExit with a message), no traceback."""
    monkeypatch.setattr(backends.registry, "_AVAILABILITY", {**backends.backend_status(), "triton": "no GPU"})
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit, match=message) as exc:
        cli.main(["verify", "--model", "cifar_resnet20"] + args)
    assert str(exc.value).startswith("fused-resnet verify: ") and "\n" not in str(exc.value)


@pytest.mark.parametrize("command", [["train"], ["experiment", "depth"], ["experiment", "gradients"]])
def test_an_unavailable_backend_is_one_line_for_every_command(command, monkeypatch):
    monkeypatch.setattr(backends.registry, "_AVAILABILITY", {**backends.backend_status(), "cuda": "no GPU"})
    with pytest.raises(SystemExit, match=f"fused-resnet {' '.join(command)}: backend 'cuda' is not available"):
        cli.main(command + ["--backend", "cuda"])
