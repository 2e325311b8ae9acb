"""What a training step's forward and backward hold, measured on the real model without memory.

The model runs on fake tensors (shapes, dtypes and devices, no data) of the device type it will train
on, so that its code takes that device's path (the CPU attention keeps the probabilities, CUDA's goes
through SDPA's memory-efficient kernel) and autocast applies as in training, at the batch asked for
(fake tensors cost nothing per sample). `saved_tensors_hooks` sees every tensor autograd keeps for
the backward; tensors sharing a storage count once and the parameters' own storages not at all (they
are counted as parameters). Each storage is charged to the residual block that first saved it, which
gives what activation checkpointing keeps without a second run.

The backward cannot run on fake CUDA tensors without a GPU (autograd's device threads need a CUDA
context), so the forward+backward is replayed on fake CPU tensors, without and with activation
checkpointing, to find what lives on top of the saved activations at the step's peak: outputs, loss
and backward temporaries, a checkpointed block's recomputation, and the gradients produced by then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..engine.parallelize import transformer_blocks
from ..zoo import ModelSpec, build_model

OUTSIDE = -1  # the block index of storages saved outside every residual block
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SavedBytes:
    """What one training forward keeps for the backward, in bytes."""

    total: int
    """All saved activations without checkpointing."""
    outside: int
    """Saved outside the residual blocks (patch embedding, merging, norms, decoder, loss)."""
    blocks: tuple[int, ...]
    """Saved inside each residual block, in forward order."""
    block_inputs: int
    """The blocks' distinct inputs (not saved outside them): what checkpointing keeps of the blocks."""

    @property
    def checkpointed(self) -> int:
        """Kept with every block checkpointed, at the backward's peak: everything outside the blocks, each
        block's input, and one block's recomputed activations."""
        return self.outside + self.block_inputs + max(self.blocks, default=0)


@dataclass(frozen=True)
class StepMemory:
    """The forward+backward's peaks on top of parameters and optimizer state, in bytes (fake CPU replays,
    without and with every block checkpointed)."""

    saved: SavedBytes
    """Activations saved for the backward on the CPU path."""
    peak: int
    """Highest total of everything allocated during forward and backward, gradients included."""
    peak_without_grads: int
    """The same without the parameters' gradients (what stays when they are sharded away at once)."""
    peak_checkpointed: int
    peak_checkpointed_without_grads: int

    def extra(self, checkpointed: bool, grads: bool) -> int:
        """What the peak holds on top of the saved activations."""
        if checkpointed:
            return (self.peak_checkpointed if grads else self.peak_checkpointed_without_grads) - self.saved.checkpointed
        return (self.peak if grads else self.peak_without_grads) - self.saved.total


@contextlib.contextmanager
def forced_autocast(device_type: str, precision: str) -> Iterator[None]:
    """The training autocast ("fp32": none) on `device_type`, even without its runtime: torch.autocast
    ("cuda") turns itself off without a GPU, but fake CUDA tensors take the autocast kernels all the same."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        yield
        return
    enabled, old_dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, enabled)
        torch.set_autocast_dtype(device_type, old_dtype)
        torch.clear_autocast_cache()


def example_inputs(model: nn.Module, spec: ModelSpec, batch: int, device: str | torch.device) -> tuple:
    """A batch of the model's training inputs on `device`: images, and the masks or class targets."""
    size = model.encoder.cfg.img_size
    images = torch.zeros(batch, 3, size, size, device=device)
    if spec.task == "pretrain":
        return images, model.random_mask(batch).to(device)
    return images, torch.zeros(batch, dtype=torch.long, device=device)


def training_loss(model: nn.Module, spec: ModelSpec, inputs: tuple) -> torch.Tensor:
    """The scalar loss of one training forward (SimMIM's, or cross-entropy for a classifier)."""
    if spec.task == "pretrain":
        return model(*inputs).loss
    return nn.functional.cross_entropy(model(inputs[0]), inputs[1])


def meta_model(spec: ModelSpec, **overrides) -> nn.Module:
    """The spec's model on the meta device in training mode, after one forward: the index tables the
    models cache are then real CPU tensors (computed under a FakeTensorMode they would be fake and
    data-dependent). Build it outside the FakeTensorMode that `to_empty` moves it into."""
    with torch.device("meta"):
        model = build_model(spec, **overrides).train()
        with torch.no_grad():
            inputs = example_inputs(model, spec, 1, "meta")
            model(*inputs) if spec.task == "pretrain" else model(inputs[0])
    return model


class _EfficientAttention(TorchFunctionMode):
    """SDPA as a GPU runs it for our models: its memory-efficient kernel (a float bias that needs a
    gradient rules out flash attention). A CPU-only torch cannot select CUDA kernels and would take the
    math path on fake CUDA tensors, keeping the probabilities too; this calls the kernel's op directly,
    after SDPA's preprocessing of the bias (padded to a multiple of 8 elements, expanded)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        options = {**dict(zip(names, args[3:], strict=False)), **kwargs}
        q, k, v = args[:3]
        bias = options.get("attn_mask")
        if bias is not None:
            n = bias.shape[-1]
            bias = nn.functional.pad(bias, (0, -n % 8))[..., :n] if n % 8 else bias
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, options.get("dropout_p", 0.0), options.get("is_causal", False),
            scale=options.get("scale"))[0]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


class _SavedTensors:
    """saved_tensors_hooks that charge each new storage to the block running when it was saved."""

    def __init__(self, model: nn.Module):
        self.params = {_storage(p)[0] for p in model.parameters()}
        self.owner: dict[int, tuple[int, int]] = {}  # storage -> (block index or OUTSIDE, bytes)
        self.inputs: dict[int, int] = {}
        self.current = OUTSIDE
        self.blocks = transformer_blocks(model)
        self.handles = [h for i, block in enumerate(self.blocks) for h in
                        (block.register_forward_pre_hook(self._enter(i)), block.register_forward_hook(self._leave))]

    def _enter(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.current = index
            key, size = _storage(args[0])
            self.inputs[key] = size
        return hook

    def _leave(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.current = OUTSIDE

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key, size = _storage(t)
        if key not in self.params and key not in self.owner:
            self.owner[key] = (self.current, size)
        return t

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def result(self) -> SavedBytes:
        for h in self.handles:
            h.remove()
        per_block = [0] * len(self.blocks)
        for index, size in self.owner.values():
            if index != OUTSIDE:
                per_block[index] += size
        outside = sum(size for index, size in self.owner.values() if index == OUTSIDE)
        inputs = sum(size for key, size in self.inputs.items() if self.owner.get(key, (None,))[0] != OUTSIDE)
        return SavedBytes(sum(size for _, size in self.owner.values()), outside, tuple(per_block), inputs)


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the storages that ops create while they are alive, and the peak; `held` are the
    storages allocated before (parameters, buffers, inputs), which views of them share."""

    def __init__(self, held: set[int]):
        super().__init__()
        self.held = held
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.grads: set[int] = set()
        self.now = self.now_grads = self.peak = self.peak_without_grads = 0

    def mark_grad(self, param: torch.Tensor) -> None:
        key, size = _storage(param.grad)
        if key in self.live and key not in self.grads:
            self.grads.add(key)
            self.now_grads += size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size
                if key in self.grads:
                    self.grads.discard(key)
                    self.now_grads -= size
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                key, size = _storage(t)
                if key not in self.live and key not in self.held:
                    self.live[key] = (StorageWeakRef(t.untyped_storage()), size)
                    self.now += size
        self.peak = max(self.peak, self.now)
        self.peak_without_grads = max(self.peak_without_grads, self.now - self.now_grads)
        return out


def saved_bytes(spec: ModelSpec, batch: int, precision: str = "fp32", device: str = "cuda",
                **overrides) -> SavedBytes:
    """What a training forward of `spec`'s model at `batch` keeps for the backward on `device` ("cpu" or
    "cuda", neither needed here) under `precision` ("fp32", or "bf16"/"fp16" autocast)."""
    model = meta_model(spec, **overrides)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device=device)
        saved = _SavedTensors(model)
        inputs = example_inputs(model, spec, batch, device)
        attention = _EfficientAttention() if device == "cuda" else contextlib.nullcontext()
        with saved.hooks(), forced_autocast(device, precision), attention:
            training_loss(model, spec, inputs)
    return saved.result()


def _replay(spec: ModelSpec, batch: int, precision: str, checkpointing: bool) -> tuple[SavedBytes, int, int]:
    """(saved activations, peak, peak without gradients) of a forward and backward on fake CPU tensors,
    on top of what was held before (parameters, buffers, the input batch)."""
    model = meta_model(spec, use_checkpoint=checkpointing)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        saved = _SavedTensors(model)
        inputs = example_inputs(model, spec, batch, "cpu")
        held = [*model.parameters(), *model.buffers(), *inputs]
        live = _LiveBytes({_storage(t)[0] for t in held})
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(live.mark_grad)
        with live:
            with saved.hooks(), forced_autocast("cpu", precision):
                loss = training_loss(model, spec, inputs)
            loss.backward()
            del loss
    return saved.result(), live.peak, live.peak_without_grads


def step_memory(spec: ModelSpec, batch: int, precision: str = "fp32") -> StepMemory:
    """Replays a training forward and backward of `spec`'s model at `batch` on fake CPU tensors, without
    and with activation checkpointing (whose saved tensors the hooks do not see: only its peaks count)."""
    saved, peak, peak_without_grads = _replay(spec, batch, precision, False)
    _, peak_checkpointed, peak_checkpointed_without_grads = _replay(spec, batch, precision, True)
    return StepMemory(saved, peak, peak_without_grads, peak_checkpointed, peak_checkpointed_without_grads)
