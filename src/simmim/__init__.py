"""simmim: SimMIM masked image modeling (Xie et al., CVPR 2022) in PyTorch."""

from __future__ import annotations

from .zoo import list_models
from .zoo.hub import get_model

__version__ = "0.1.0"
__all__ = ["get_model", "inference_model", "list_models", "__version__"]


def __getattr__(name: str):
    if name == "inference_model":  # imported on use: it pulls in the image stack and timm
        from .inference import inference_model

        return inference_model
    raise AttributeError(f"module 'simmim' has no attribute {name!r}")
