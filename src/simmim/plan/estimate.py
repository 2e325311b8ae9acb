"""Per-GPU memory and step time of a training run under DDP, FSDP2 and FSDP2 with activation checkpointing.

Measured (by `profile_model`, on fake tensors): parameter counts and the FSDP units, forward
multiply-adds, the activations saved for the backward, and what else the forward+backward holds at its
peak. Modelled (here): how DDP and FSDP2 hold parameters, gradients and AdamW's state, and the step
time from the FLOPs at an assumed utilisation and the collectives at the links' rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.parallelize import transformer_blocks
from ..errors import UsageError
from ..zoo import get_spec
from ..zoo.flops import count_macs
from .activations import SavedBytes, StepMemory, example_inputs, meta_model, saved_bytes, step_memory
from .hardware import GPU, GPUS

STRATEGIES = ("ddp", "fsdp", "fsdp+ac")
PRECISIONS = ("fp32", "bf16", "fp16")
MASTER = 4  # bytes per parameter, gradient and AdamW moment: all fp32 (autocast keeps the parameters fp32)


@dataclass(frozen=True)
class PlanConfig:
    """What to plan: a zoo model trained on `gpus` GPUs with `batch` images each."""

    model: str
    gpus: int = 8
    batch: int = 64
    """Images per GPU per step."""
    precision: str = "bf16"
    """Autocast precision of the forward: fp32, bf16 or fp16 (parameters stay fp32)."""
    gpu: str = "h100"
    """A key of `hardware.GPUS`."""
    utilization: float = 0.4
    """Assumed fraction of the peak FLOP rate a step reaches."""
    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise UsageError(f"gpus={self.gpus}: expected at least 1")
        if self.batch < 1:
            raise UsageError(f"batch={self.batch}: expected at least 1 image per GPU")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.gpu not in GPUS:
            raise UsageError(f"gpu {self.gpu!r}: expected one of {', '.join(GPUS)}")
        if not 0 < self.utilization <= 1:
            raise UsageError(f"utilization={self.utilization}: expected a fraction in (0, 1]")
        get_spec(self.model)  # an unknown name fails here, with the closest ones


@dataclass(frozen=True)
class ModelProfile:
    """The measured figures of one model at one batch size and precision."""

    name: str
    params: int
    buffer_bytes: int
    largest_param: int
    """Elements of the largest parameter tensor (the CPU AdamW's temporaries are two of it)."""
    root_params: int
    """Parameters outside the residual blocks: FSDP2's root unit."""
    largest_block: int
    """Parameters of the largest residual block: the largest FSDP2 unit but the root."""
    macs: int
    """Multiply-adds of one image's training forward."""
    batch: int
    precision: str
    saved: SavedBytes
    """Activations kept for the backward, on the target device's code path."""
    step: StepMemory
    """The forward+backward's peak on the CPU path."""


@dataclass(frozen=True)
class StrategyPlan:
    """Per-GPU memory (bytes) and step time (seconds) of one parallelism strategy."""

    strategy: str
    params: int
    """Parameters: replicated (DDP), or the shard plus the units being gathered (FSDP)."""
    grads: int
    """Gradients: replicated plus DDP's buckets, or the shard plus the units being reduced (FSDP)."""
    optimizer: int
    """AdamW's exp_avg and exp_avg_sq in fp32 (replicated or sharded)."""
    activations: int
    """Saved for the backward (with checkpointing: outside the blocks, block inputs and one block)."""
    peak: int
    """Estimated peak allocated: held state plus the larger of the forward+backward's and the
    optimizer step's working memory."""
    fits: bool
    compute_s: float
    comm_bytes: int
    """Bytes each GPU sends per step (ring collectives)."""
    comm_s: float
    step_s: float
    """max(compute, communication): both strategies overlap their collectives with the backward."""
    images_per_s: float


@dataclass(frozen=True)
class Plan:
    """The plan of one configuration: its inputs, the measured model and each strategy."""

    config: PlanConfig
    profile: ModelProfile
    gpu: GPU
    strategies: tuple[StrategyPlan, ...]


def profile_model(name: str, batch: int, precision: str, device: str = "cuda") -> ModelProfile:
    """Measures a zoo model for planning (on fake tensors: no memory, no GPU needed)."""
    spec = get_spec(name)
    model = meta_model(spec)
    with torch.device("meta"):
        inputs = example_inputs(model, spec, 1, "meta")
        macs = count_macs(model, *inputs[: 2 if spec.task == "pretrain" else 1]).total
    params = [p.numel() for p in model.parameters()]
    blocks = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model)]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelProfile(spec.name, sum(params), buffers, max(params), sum(params) - sum(blocks), max(blocks, default=0),
                        macs, batch, precision, saved_bytes(spec, batch, precision, device),
                        step_memory(spec, batch, precision))


def optimizer_temporaries(profile: ModelProfile, device: str, shards: int = 1) -> int:
    """Bytes AdamW's step allocates for a moment: its foreach kernels on CUDA one fp32 copy of the (local)
    parameters; its per-tensor loop on the CPU two of the largest (local) tensor."""
    if device == "cuda":
        return MASTER * -(-profile.params // shards)
    return 2 * MASTER * -(-profile.largest_param // shards)


def gather_bytes(precision: str) -> int:
    """Bytes per parameter FSDP2 gathers, as the engine shards (`engine.parallelize.shard`): bf16 under
    bf16 autocast (its MixedPrecisionPolicy), else the fp32 parameters themselves."""
    return 2 if precision == "bf16" else MASTER


def strategy_memory(profile: ModelProfile, strategy: str, gpus: int, device: str = "cuda"
                    ) -> tuple[int, int, int, int, int]:
    """(params, grads, optimizer, activations, peak) bytes per GPU of a strategy: "ddp" or "fsdp", with
    "+ac" for activation checkpointing of every residual block. One GPU under "ddp" is a plain process."""
    p = profile.params
    checkpointed = strategy.endswith("+ac")
    activations = profile.saved.checkpointed if checkpointed else profile.saved.total
    if strategy.startswith("ddp"):
        buckets = MASTER * p if gpus > 1 else 0  # DDP copies the gradients into its all-reduce buckets
        held = MASTER * p + profile.buffer_bytes + 2 * MASTER * p + buckets
        # on top of the saved activations, as the CPU replay found it, with the gradients produced by then
        backward = activations + profile.step.extra(checkpointed, grads=True)
        step = MASTER * p + optimizer_temporaries(profile, device)
        return (MASTER * p + profile.buffer_bytes, MASTER * p + buckets, 2 * MASTER * p, activations,
                held + max(backward, step))
    shard, gathered = -(-p // gpus), gather_bytes(profile.precision)
    in_flight = profile.root_params + 2 * profile.largest_block  # the root stays gathered; one unit prefetched
    held = MASTER * shard + profile.buffer_bytes + 2 * MASTER * shard
    # early in the backward, with the activations still there: the gathered units, and the unsharded
    # gradients of the root (reduced at the end) and of the block being differentiated; the gradient
    # shard fills in as the activations are freed, as in the optimizer step
    grads_in_flight = MASTER * (profile.root_params + profile.largest_block)
    backward = activations + profile.step.extra(checkpointed, grads=False) + gathered * in_flight
    backward += grads_in_flight
    step = MASTER * shard + optimizer_temporaries(profile, device, gpus)
    return (MASTER * shard + gathered * in_flight + profile.buffer_bytes, MASTER * shard + grads_in_flight,
            2 * MASTER * shard, activations, held + max(backward, step))


def communication(profile: ModelProfile, strategy: str, gpus: int, gathered: int) -> int:
    """Bytes each GPU sends per step: a ring all-reduce of the fp32 gradients (DDP), or all-gathers of
    the parameters in forward and backward and a reduce-scatter of the gradients (FSDP2)."""
    ring = (gpus - 1) / gpus
    if strategy == "ddp":
        return round(2 * ring * MASTER * profile.params)
    return round(ring * profile.params * (2 * gathered + MASTER))


def plan(cfg: PlanConfig, profile: ModelProfile | None = None) -> Plan:
    """The per-GPU memory and step time of `cfg` under each strategy (measures the model if no profile)."""
    profile = profile or profile_model(cfg.model, cfg.batch, cfg.precision)
    if (profile.name, profile.batch, profile.precision) != (get_spec(cfg.model).name, cfg.batch, cfg.precision):
        raise UsageError(f"the profile of {profile.name} at batch {profile.batch} in {profile.precision} does not "
                         f"match the plan's {cfg.model} at batch {cfg.batch} in {cfg.precision}")
    gpu = GPUS[cfg.gpu]
    gather = gather_bytes(cfg.precision)
    bandwidth = gpu.nvlink if cfg.gpus <= gpu.per_node else gpu.network
    rows = []
    for strategy in STRATEGIES:
        params, grads, optimizer, activations, peak = strategy_memory(profile, strategy, cfg.gpus, "cuda")
        forwards = 4 if strategy == "fsdp+ac" else 3  # the backward costs two forwards, checkpointing one more
        compute = 2 * forwards * profile.macs * cfg.batch / (gpu.flops(cfg.precision) * cfg.utilization)
        comm = communication(profile, strategy, cfg.gpus, gather)
        step = max(compute, comm / bandwidth)
        rows.append(StrategyPlan(strategy, params, grads, optimizer, activations, peak, peak <= gpu.memory,
                                 compute, comm, comm / bandwidth, step, cfg.gpus * cfg.batch / step))
    return Plan(cfg, profile, gpu, tuple(rows))
