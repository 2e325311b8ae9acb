"""Training and evaluation: `pretrain(cfg)`, `finetune(cfg)`, `evaluate(ckpt_or_model, data)`, and the
CLI subcommands (`add_commands`).

Names are imported on first use: the training stack (torchvision, timm, torch.distributed.checkpoint)
takes seconds to import, and the CLI mounts `add_commands` for every command it runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"add_commands": "commands", "evaluate": "evaluation", "finetune": "finetuning", "pretrain": "pretraining",
          "NonFiniteLossError": "loop", "RunResult": "loop"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
