"""fused-resnet train: data loaders, learning, output files, reproducibility, exact resume, clear errors."""
import json
import pickle

import numpy as np
import pytest
import torch

from fused_resnet.tools import cli, data, train

TINY = {"data": "mnist1d", "model": "cifar_resnet8", "epochs": 3, "batch_size": 64, "subset": 256}


def _history(path):
    return json.loads((path / "history.json").read_text())["epochs"]


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def mnist1d():
    return data.mnist1d()


def test_mnist1d_is_generated_locally_with_the_documented_shapes(mnist1d):
    x, y = mnist1d.train.tensors
    assert x.shape == (4000, 1, 40) and x.dtype == torch.float32 and y.shape == (4000,)
    assert mnist1d.test.tensors[0].shape == (1000, 1, 40)
    assert sorted(y.unique().tolist()) == list(range(10))
    state = np.random.get_state()[1].copy()
    assert torch.equal(data.mnist1d().train.tensors[0], x)  # same data every time
    assert (np.random.get_state()[1] == state).all()  # and numpy's global RNG is left as it was


def test_train_cli_learns_and_writes_history_curves_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "cifar_resnet8", "--epochs", "3", "--batch-size", "64", "--subset", "512",
                     "--out", str(out)]) == 0
    assert "epoch 3/3" in capsys.readouterr().out
    history = _history(out)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["train_acc"] > 0.3 and history[-1]["test_acc"] > 0.3  # chance is 0.1
    assert all(h["seconds"] > 0 for h in history)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt")
    assert len(ckpt["history"]) == 3 and ckpt["config"]["model"] == "cifar_resnet8"


def test_same_seed_same_history_other_seed_other_history(mnist1d):
    runs = [train.train(train.TrainConfig(**TINY, seed=s), data=mnist1d, quiet=True) for s in (1, 1, 2)]
    assert _without_seconds(runs[0]) == _without_seconds(runs[1])
    assert _without_seconds(runs[0]) != _without_seconds(runs[2])


class _Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tmp_path, mnist1d, monkeypatch):
    cfg = train.TrainConfig(**TINY)
    train.train(cfg, out=tmp_path / "full", data=mnist1d, quiet=True)

    evaluate = train.Trainer.evaluate
    calls = []

    def dies_in_epoch_3(self, loader):
        calls.append(1)
        if len(calls) == 3:
            raise _Interrupted  # killed after epoch 3's training steps, before its checkpoint
        return evaluate(self, loader)

    monkeypatch.setattr(train.Trainer, "evaluate", dies_in_epoch_3)
    with pytest.raises(_Interrupted):
        train.train(cfg, out=tmp_path / "cut", data=mnist1d, quiet=True)
    monkeypatch.setattr(train.Trainer, "evaluate", evaluate)
    assert len(_history(tmp_path / "cut")) == 2
    train.train(cfg, out=tmp_path / "cut", resume=tmp_path / "cut" / "checkpoint.pt", data=mnist1d, quiet=True)

    assert _without_seconds(_history(tmp_path / "cut")) == _without_seconds(_history(tmp_path / "full"))
    full, resumed = (torch.load(tmp_path / d / "checkpoint.pt") for d in ("full", "cut"))
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert torch.equal(full["rng_torch"], resumed["rng_torch"])


def test_resume_with_other_options_is_refused(tmp_path, mnist1d):
    cfg = train.TrainConfig(**(TINY | {"epochs": 1}))
    train.train(cfg, out=tmp_path, data=mnist1d, quiet=True)
    with pytest.raises(ValueError, match=r"lr=0.05 \(now 0.1\)"):
        train.train(train.TrainConfig(**(TINY | {"epochs": 1, "lr": 0.1})), resume=tmp_path / "checkpoint.pt",
                    data=mnist1d, quiet=True)


def _fake_cifar10(root, n=8):
    """A folder in CIFAR-10's python-pickle format, n random images per batch file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_cifar10_python_format(tmp_path, capsys):
    root = _fake_cifar10(tmp_path / "cifar")
    d = data.load(f"cifar10:{root}")
    assert (len(d.train), len(d.test), d.in_channels, d.dim) == (40, 8, 3, 2)
    x, y = d.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert data.load(f"cifar10:{root / 'cifar-10-batches-py'}").test[3][0].shape == (3, 32, 32)  # the folder itself
    out = tmp_path / "run"
    assert cli.main(["train", "--data", f"cifar10:{root}", "--model", "cifar_resnet8", "--epochs", "1",
                     "--batch-size", "16", "--shortcut", "B", "--amp", "bfloat16", "--out", str(out), "--quiet"]) == 0
    assert len(_history(out)) == 1


def test_imagefolder_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    d = data.load(f"imagefolder:{tmp_path}", image_size=16)
    assert (len(d.train), len(d.test), d.num_classes) == (8, 8, 2)
    assert d.train[0][0].shape == d.test[0][0].shape == (3, 16, 16)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", f"imagefolder:{tmp_path}", "--image-size", "16", "--model", "resnet18",
                     "--epochs", "1", "--batch-size", "4", "--channels-last", "--out", str(out), "--quiet"]) == 0
    assert _history(out)[0]["test_acc"] >= 0


def test_synthetic_data_is_learnable():
    d = data.synthetic()
    x, y = d.train.tensors
    assert x.shape == (2048, 3, 32, 32)
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    x_test, y_test = d.test.tensors
    nearest_mean = torch.cdist(x_test.flatten(1), means).argmin(1)
    assert (nearest_mean == y_test).float().mean() > 0.9  # chance is 0.1


@pytest.mark.parametrize("args, message", [
    (["--data", "cifar10:/nonexistent/cifar"], "expected the python version's folder cifar-10-batches-py"),
    (["--data", "imagefolder:/nonexistent/images"], "has no train or val folder"),
    (["--data", "mnist2d"], "unknown data spec 'mnist2d'"),
    (["--model", "vgg16", "--data", "synthetic"], "unknown model 'vgg16'"),
    (["--model", "cifar_resnet21", "--data", "synthetic"], "depth must be 6n\\+2"),
    (["--model", "resnet18", "--data", "synthetic", "--plain"], "--plain and --shortcut apply to cifar_resnet"),
    (["--model", "resnet18"], "resnet18 takes images; mnist1d is 1-D"),
    (["--channels-last"], "channels_last applies to 2-D"),
    (["--data", "synthetic", "--epochs", "0"], "epochs and batch size must be positive"),
    (["--data", "synthetic", "--resume", "/nonexistent/checkpoint.pt"], "no checkpoint at"),
    (["--data", "synthetic", "--residual-scale", "big"], "residual scale must be 'learnable' or a number"),
    (["--data", "synthetic", "--sync-bn"], "give --ddp too"),
    (["--data", "synthetic", "--ddp"], "--ddp runs under torchrun"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--out", str(tmp_path), "--subset", "64", "--quiet"] + args)


def test_missing_wrong_cifar_file_is_a_clear_error(tmp_path):
    root = _fake_cifar10(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ValueError, match="has no test_batch"):
        data.load(f"cifar10:{root}")
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"must be uint8 of shape \(N, 3072\)"):
        data.load(f"cifar10:{root}")


def test_missing_training_dependency_names_the_extra():
    with pytest.raises(ImportError, match=r'pip install "fused_resnet\[train\]"'):
        data.optional_import("no_such_module_for_fused_resnet")


def test_sync_bn_on_cpu_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match="--sync-bn needs CUDA"):
        cli.main(["train", "--out", str(tmp_path), "--data", "synthetic", "--ddp", "--sync-bn", "--device", "cpu"])
    assert not torch.distributed.is_initialized()


def test_residual_scale_option_builds_learnable_scales(mnist1d):
    cfg = train.TrainConfig(model="cifar_resnet8", residual_scale="learnable")
    model = train.build_model(cfg, mnist1d)
    assert sum(n.endswith("residual_scale") for n, _ in model.named_parameters()) == 3


def test_ddp_two_processes_on_the_cpu(tmp_path):
    """torchrun with 2 processes (gloo): rank 0 alone logs and writes; the epoch's metrics cover both shares."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fused_resnet.tools.cli", "train", "--ddp", "--model", "cifar_resnet8", "--epochs", "2",
           "--subset", "256", "--batch-size", "32", "--backend", "reference", "--residual-scale", "learnable",
           "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("final:") == 1 and run.stdout.count("epoch 2/2") == 1, run.stdout
    assert "2 processes" in run.stdout
    history = _history(out)
    assert [h["epoch"] for h in history] == [1, 2]
    ckpt = torch.load(out / "checkpoint.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the model's own state_dict, not DDP's
    assert sum(k.endswith("residual_scale") for k in ckpt["model"]) == 3
    assert ckpt["config"]["ddp"] is True
