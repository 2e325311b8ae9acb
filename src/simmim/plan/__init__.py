"""Memory and throughput planner: per-GPU memory and step time of a zoo model under DDP, FSDP2 and
FSDP2 with activation checkpointing, from measurements of the model on fake tensors.

    simmim plan MODEL --gpus 8,16,32,64 --batch 32 [--gpu h100] [--precision bf16] [--json]
    simmim plan MODEL ... --markdown docs/plan.md --check    # the doc page, with the measured check
"""

from __future__ import annotations

from .estimate import STRATEGIES, ModelProfile, Plan, PlanConfig, StrategyPlan, plan, profile_model, strategy_memory
from .hardware import GPU, GPUS

__all__ = ["GPU", "GPUS", "STRATEGIES", "ModelProfile", "Plan", "PlanConfig", "StrategyPlan", "plan",
           "profile_model", "strategy_memory"]
