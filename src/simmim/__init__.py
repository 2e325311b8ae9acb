"""simmim: SimMIM masked image modeling (Xie et al., CVPR 2022) in PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["detection_backbone", "get_model", "inference_model", "list_models", "__version__"]

# imported on first use, so that `simmim --help` starts without torch; inference_model also pulls in
# the image stack and timm
_HOMES = {"detection_backbone": ".detection", "get_model": ".zoo.hub", "inference_model": ".inference",
          "list_models": ".zoo"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'simmim' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
