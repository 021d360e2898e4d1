"""The account of one training step (or one eval forward): every kernel launch, its compulsory DRAM bytes and FLOPs.

How a step is seen: the model and its input are fake tensors on the CPU device (meta storage: shapes, dtypes and
strides, no data, no compute), and a ``TorchDispatchMode`` sees every aten op the step dispatches below autograd —
forward, loss, backward and the optimizer step, with autocast's casts where ``amp`` is on (autocast follows the
CPU device's rules, which for ResNet's ops are CUDA's: convolutions and matmuls in the low dtype). Each aten op is
mapped to the kernels eager PyTorch launches for it on a CUDA GPU (``kernel_table``), recorded through
``fused_resnet.launches`` — the one place launches are collected, which the fused backends' launchers report to as
well.

Providers (``PROVIDERS``): ``eager`` (torchvision's model), ``reference`` (the model converted to backend
reference: the fused ops' pure-torch twin, each of its aten ops mapped like eager's), and the fused backends
``triton``, ``cuda`` and ``cuda-unfused``, whose blocks run their own methods on the fake tensors: their aten ops
are mapped like eager's, and their launchers report each kernel they would launch (the Triton launchers in
kernels/, the extension's C++ block ops through their dry run on meta tensors, csrc/account.h). Ops outside the blocks (max-pool, average pool, fc, loss, optimizer) are mapped like eager's in
every provider.

Where a launch belongs (``Launch.where``): the module path that issued it (``layer1.0.bn2``; a fused op: its block,
``stem`` for a fused stem), set through ``launches.located`` from module hooks in forward and, in backward, from
the autograd node that runs: each node is tagged, when its module's forward finishes, with the module it was made
in. ``loss`` and ``optimizer`` name the rest of the step.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from .. import backends, launches, models
from ..convert import convert
from ..spec import BlockSpec
from ..tensors import Forward, Params, pack_forward, pack_grads
from ..testing import DTYPES
from . import kernel_table
from .benchmark import _BLOCK_TYPES, build_model

MODES = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Config:
    """One step to account. ``size``: image side (or sequence length for ``dim=1``), None for the model's own;
    ``amp``: a float32 model under torch.autocast(dtype) instead of a model in ``dtype``; ``optimizer``: the
    training step includes SGD with momentum (foreach, as torch picks on CUDA), as ``fused-resnet bench`` times it."""

    model: str = "resnet50"
    batch: int = 256
    size: Optional[int] = None
    dtype: str = "bfloat16"
    channels_last: bool = True
    mode: str = "train"
    amp: bool = False
    optimizer: bool = True
    dim: int = 2

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last and self.dim == 2 else ("NCL" if self.dim == 1 else "NCHW")


# ---------------------------------------------------------------------------------------------- providers
class Provider(NamedTuple):
    """How one provider's step is accounted. ``backend``: convert the model to this backend (None: torchvision's
    model as it is); ``fused_op(mode, call)``: account one ``fused_resnet::`` op and return its outputs."""

    name: str
    backend: Optional[str]
    fused_op: Optional[Callable[["StepMode", kernel_table.Call], object]]


PROVIDERS: Dict[str, Provider] = {}


def register_provider(provider: Provider) -> None:
    PROVIDERS[provider.name] = provider


def _backend_fused_op(name: str) -> Callable[["StepMode", kernel_table.Call], object]:
    """Account a fused op by running backend ``name``'s method for it on the fake tensors (what the op's own
    implementation calls): its aten ops recorded like eager's, its launchers' kernels reported by the launchers
    themselves (Triton's, the extension's C++ ops, in a dry run)."""
    return lambda mode, call: _run_backend(backends.get(name), mode, call)


def _drop_path(args: dict) -> dict:
    """The training op's stochastic depth, as the backend takes it (a keyword only where the call had one)."""
    return {} if args.get("sample_scale") is None else {"sample_scale": args["sample_scale"]}


def _run_backend(backend, mode: "StepMode", call: kernel_table.Call):
    a = call.args
    with mode:  # the backend's aten ops go through this mode again
        if call.name == "fused_resnet::bn_running_update":
            count = a["count"] if a["group_count"] is None else a["group_count"]
            backend.bn_running_update(a["running_mean"], a["running_var"], a["num_batches_tracked"], a["mean"],
                                      a["var"], count, a["momentum"])
            return None
        spec = BlockSpec.from_schema(a["spec"], a["spec_floats"])
        if call.name == "fused_resnet::block_forward":
            params = Params(a["weights"], a["gammas"], a["betas"], a["running_means"], a["running_vars"])
            return pack_forward(backend.block_forward(spec, a["x"], params, a["residual"], **_drop_path(a)))
        if call.name == "fused_resnet::block_inference":
            params = Params(a["weights"], a["gammas"], a["betas"], a["running_means"], a["running_vars"])
            return backend.block_inference(spec, a["x"], params, a["residual"])
        if call.name == "fused_resnet::block_backward":
            n = len(a["weights"])
            params = Params(a["weights"], a["gammas"], a["betas"], [None] * n, [None] * n)
            saved = Forward(a["y"], a["acts"], a["means"], a["variances"], a["counts"])
            return pack_grads(backend.block_backward(spec, a["dy"], a["x"], params, saved, a["need_input_grad"],
                                                     **_drop_path(a)), a["x"])
    raise kernel_table.UnmappedOp(f"backend {backend.name!r} has no route for {call.func}")


register_provider(Provider("eager", None, None))
for _name in ("reference", "triton", "cuda", "cuda-unfused"):
    register_provider(Provider(_name, _name, _backend_fused_op(_name)))


def provider(name: str) -> Provider:
    """The registered provider ``name``."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; expected one of {sorted(PROVIDERS)}")
    return PROVIDERS[name]


# ---------------------------------------------------------------------------------------------- the dispatch mode
class StepMode(TorchDispatchMode):
    """Records, for every op dispatched inside, the kernels eager PyTorch launches for it on CUDA; fused ops go to
    the provider. In backward, launches are located by the autograd node that runs (``tags``)."""

    def __init__(self, prov: Provider, tags: Dict[int, str]):
        super().__init__()
        self.provider = prov
        self.tags = tags
        self.aten_ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        node = torch._C._current_autograd_node()
        # In backward, the node that runs names the module it was made in; "" is the model's top level.
        tag = self.tags.get(id(node)) if node is not None else None
        if func.namespace == "fused_resnet":
            # A fused op made at the top level is the fused stem: the only fused unit a model's own forward calls.
            top = tag == "" or (tag is None and not launches.where())
            with launches.located("stem" if top else tag or launches.where()):
                return self._fused(func, args, kwargs)
        with launches.located(tag) if tag else contextlib.nullcontext():
            if not kernel_table.is_known(func._schema.name) and torch._C._dispatch_has_kernel_for_dispatch_key(
                    func.name(), "CompositeImplicitAutograd"):
                # Below autograd (inside a fused op's implementation) composite ops reach this mode undecomposed;
                # eager PyTorch runs what they decompose into.
                with self:
                    return func.decompose(*args, **kwargs)
            out = func(*args, **kwargs)
            if func.namespace not in ("prim", "profiler"):
                self.aten_ops.append(func._schema.name)
            kernel_table.record_call(kernel_table.Call(func, args, kwargs, out))
            return out

    def _fused(self, func, args, kwargs):
        if self.provider.fused_op is None:
            raise kernel_table.UnmappedOp(f"provider {self.provider.name!r} runs no fused op, but {func} was called")
        return self.provider.fused_op(self, kernel_table.Call(func, args, kwargs, None))


# ---------------------------------------------------------------------------------------------- where, by hooks
class _Tagger:
    """Module hooks that locate forward launches and tag each autograd node with the module it was made in."""

    def __init__(self, tags: Dict[int, str], root: str):
        self.tags = tags
        self.root = root  # what the model's own forward computes between its modules: a fused stem, or nothing
        self.keep: List[object] = []  # the tagged nodes, alive for the step (ids stay unique)
        self.stack: List[contextlib.AbstractContextManager] = []

    def tag(self, values, where: str) -> None:
        todo = [t.grad_fn for t in _tensors(values) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or id(node) in self.tags:
                continue
            self.tags[id(node)] = where
            self.keep.append(node)
            todo.extend(nxt for nxt, _ in node.next_functions)

    def pre(self, path: str):
        def hook(module, args):
            self.tag(args, launches.where() or self.root)  # made by the enclosing module between its children
            cm = launches.located(path)
            cm.__enter__()
            self.stack.append(cm)
        return hook

    def post(self, path: str):
        def hook(module, args, out):
            self.tag(out, path)
            self.stack.pop().__exit__(None, None, None)
        return hook


def _tensors(values) -> List[Tensor]:
    if isinstance(values, Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _tensors(v)]
    if isinstance(values, dict):
        return [t for v in values.values() for t in _tensors(v)]
    return []


def _located_modules(model: nn.Module, fused: bool) -> List[Tuple[str, nn.Module]]:
    """The modules whose forward names its launches. Eager: every module below the root. A converted model: the
    blocks and the top-level modules a fused stem does not replace — a hook on a fused block's submodule would make
    it run its eager computation (fused_resnet.guard)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if not fused:
        return named
    blocks = [n for n, m in named if isinstance(m, _BLOCK_TYPES)]
    stem = {"conv1", "bn1", "relu"} if getattr(model, "backend", None) is not None else set()
    return [(n, m) for n, m in named
            if n in blocks or (not any(n.startswith(b + ".") for b in blocks) and "." not in n and n not in stem
                               and not isinstance(m, nn.Sequential))]


def _label(path: str, stem: Sequence[str]) -> str:
    top = path.split(".")[0]
    return f"stem.{path}" if top in stem else path


# ---------------------------------------------------------------------------------------------- fake model
def _fake(mode: FakeTensorMode, t: Tensor) -> Tensor:
    return mode.fake_tensor_converter.from_meta_and_device(mode, t, torch.device("cpu"))


def _fakeify(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = nn.Parameter(_fake(mode, p.detach()), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = _fake(mode, b)
    return model


def build(config: Config, prov: Provider) -> Tuple[nn.Module, Tuple[int, ...]]:
    """(model on the meta device in the configured dtype and layout, converted for the provider; per-sample input
    shape)."""
    with torch.device("meta"):
        if config.dim == 1:
            depth = models.cifar_depth(config.model)
            if depth is None:
                raise ValueError(f"dim=1 takes a cifar_resnet<6n+2> model (MNIST-1D nets), got {config.model!r}")
            model, shape = models.cifar_resnet(depth, dim=1, in_channels=1, backend=None), (1, 40)
        else:
            model, shape = build_model(config.model, num_classes=1000 if config.model.startswith("resnet") else 10)
    if config.size is not None:
        shape = (shape[0],) + (config.size,) * (len(shape) - 1)
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; expected one of {sorted(DTYPES)}")
    if not config.amp:
        model = model.to(DTYPES[config.dtype])
    if config.channels_last and config.dim == 2:
        model = model.to(memory_format=torch.channels_last)
    if prov.backend is not None:
        # Converted as for the provider's backend, which need not run here (no GPU): the account never calls it
        # through the op layer's resolution, only its methods, on fake tensors.
        model = convert(model, backend="reference", inplace=True)
        for m in model.modules():
            if getattr(m, "backend", None) is not None:
                m.backend = prov.backend
    return model, shape


# ---------------------------------------------------------------------------------------------- the account
@dataclasses.dataclass
class Account:
    """The launches of one step for one provider, with the unit kind of each (``units``, parallel)."""

    provider: str
    config: Config
    launches: List[launches.Launch]
    units: List[str]
    blocks: List[str]
    aten_ops: List[str]  # the aten ops the step dispatched below autograd, in order (schema names)

    def totals(self, select: Optional[Callable[[int], bool]] = None) -> Dict[str, float]:
        chosen = [i for i in range(len(self.launches)) if select is None or select(i)]
        rd = sum(self.launches[i].reads for i in chosen)
        wr = sum(self.launches[i].writes for i in chosen)
        fl = sum(self.launches[i].flops for i in chosen)
        b = self.config.batch
        return {"launches": len(chosen), "bytes": rd + wr, "reads": rd, "writes": wr, "flops": fl,
                "bytes_per_image": (rd + wr) / b, "flops_per_image": fl / b,
                "intensity": fl / (rd + wr) if rd + wr else 0.0}

    def block_of(self, where: str) -> str:
        for b in sorted(self.blocks, key=len, reverse=True):
            if where == b or where.startswith(b + "."):
                return b
        return where.split(".")[0] if where else "other"

    def by_block(self) -> Dict[str, Dict[str, float]]:
        names = list(dict.fromkeys(self.block_of(launch.where) for launch in self.launches))
        return {n: self.totals(lambda i, n=n: self.block_of(self.launches[i].where) == n) for n in names}

    def by_unit(self) -> Dict[str, Dict[str, float]]:
        names = [u for u in UNIT_KINDS if u in self.units]
        return {n: self.totals(lambda i, n=n: self.units[i] == n) for n in names}

    def to_json(self) -> dict:
        return {"provider": self.provider, "config": dataclasses.asdict(self.config),
                "aten_ops": len(self.aten_ops),
                "totals": self.totals(), "by_unit": self.by_unit(), "by_block": self.by_block(),
                "launches": [dict(launch._asdict(), unit=u) for launch, u in zip(self.launches, self.units)]}


UNIT_KINDS = ("stem", "blocks: conv", "blocks: reduction", "blocks: elementwise", "blocks: copy", "pool", "fc",
              "loss", "optimizer", "other")
_BLOCK_KIND = {"conv": "blocks: conv", "gemm": "blocks: conv", "graph": "blocks: conv",
               "reduction": "blocks: reduction", "elementwise": "blocks: elementwise", "copy": "blocks: copy"}


def unit_kind(launch: launches.Launch, blocks: Sequence[str], module_types: Dict[str, type]) -> str:
    """stem, pool, fc, loss, optimizer; inside a residual block, the kernel's kind (the same rule for every
    provider: eager's BN kernels are reductions and elementwise kernels like a fused backend's)."""
    where = launch.where
    top = where.split(".")[0]
    if top == "stem":
        return "stem"
    if any(where == b or where.startswith(b + ".") for b in blocks):
        return _BLOCK_KIND[launch.kind]
    if top in ("loss", "optimizer"):
        return top
    cls = module_types.get(where)
    if cls is not None and "Pool" in cls.__name__:
        return "pool"
    if cls is not None and issubclass(cls, nn.Linear):
        return "fc"
    return "other"


def inputs(config: Config, shape: Sequence[int], device="meta") -> Tuple[Tensor, Tensor]:
    """(input batch in the configured dtype and layout, uninitialised; labels, all class 0) on ``device``."""
    fmt = torch.channels_last if config.channels_last and len(shape) == 3 else torch.contiguous_format
    dtype = torch.float32 if config.amp else DTYPES[config.dtype]
    x = torch.empty((config.batch,) + tuple(shape), dtype=dtype, device=device).contiguous(memory_format=fmt)
    return x, torch.zeros(config.batch, dtype=torch.long, device=device)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum as ``fused-resnet bench`` steps it (foreach, torch's choice on CUDA), with momentum
    buffers in place: the steady state of a step after the first."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


def step(config: Config, model: nn.Module, x: Tensor, y: Tensor, opt: Optional[torch.optim.Optimizer],
         after_forward: Callable[[Tensor], None] = lambda loss: None) -> None:
    """One step as ``fused-resnet bench`` times it: eval, a forward under no_grad; train, forward, cross-entropy on
    the float32 logits, backward, the optimizer's step (when given; gradients start unset). ``amp``: forward and
    loss under torch.autocast."""
    autocast = torch.autocast(x.device.type, dtype=DTYPES[config.dtype], enabled=config.amp)
    if config.mode == "eval":
        model.eval()
        with torch.no_grad(), autocast:
            model(x)
        return
    model.train()
    with autocast:
        out = model(x)
        with launches.located("loss"):
            loss = F.cross_entropy(out.float(), y)
    after_forward(loss)
    with launches.located("loss"):
        loss.backward()
    if opt is not None:
        with launches.located("optimizer"):
            opt.step()


def account(config: Config, provider_name: str = "eager") -> Account:
    """Every launch of one step of ``config`` for ``provider_name``."""
    if config.mode not in MODES:
        raise ValueError(f"unknown mode {config.mode!r}; expected one of {MODES}")
    prov = provider(provider_name)
    model, shape = build(config, prov)
    return account_model(model, shape, config, prov)


def account_model(model: nn.Module, shape: Sequence[int], config: Config, prov: Provider) -> Account:
    """Every launch of one step of ``model`` (on the meta device, already in the configured dtype and layout and
    converted for ``prov``) for inputs of per-sample ``shape``; ``config.model`` only names it."""
    fake_mode = FakeTensorMode()
    model = _fakeify(model, fake_mode)
    x, y = (_fake(fake_mode, t) for t in inputs(config, shape))
    fused = prov.backend is not None
    stem = ("conv1", "bn1", "relu") if not fused or getattr(model, "backend", None) is None else ()
    tags: Dict[int, str] = {}
    tagger = _Tagger(tags, "" if stem else "stem")
    hooks = []
    for path, module in _located_modules(model, fused):
        label = _label(path, stem)
        hooks += [module.register_forward_pre_hook(tagger.pre(label)),
                  module.register_forward_hook(tagger.post(label))]
    blocks = [n for n, m in model.named_modules() if isinstance(m, _BLOCK_TYPES)]
    with fake_mode:
        opt = optimizer(model) if config.mode == "train" and config.optimizer else None
    mode = StepMode(prov, tags)
    try:
        with fake_mode, launches.recording(dry=True) as recorded, mode:
            step(config, model, x, y, opt, lambda loss: tagger.tag(loss, "loss"))
    finally:
        for h in hooks:
            h.remove()
    types = {_label(n, stem): type(m) for n, m in model.named_modules()}
    units = [unit_kind(launch, blocks, types) for launch in recorded]
    return Account(prov.name, config, list(recorded), units, blocks, mode.aten_ops)
