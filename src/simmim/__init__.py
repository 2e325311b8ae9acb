"""simmim: SimMIM masked image modeling (Xie et al., CVPR 2022) in PyTorch."""

from __future__ import annotations

from torch import nn

from .zoo import build_model, get_spec, list_models

__version__ = "0.1.0"
__all__ = ["get_model", "list_models", "__version__"]


def get_model(name: str, pretrained: bool | str = False, **overrides) -> nn.Module:
    """Builds a named model (see `list_models`) with optional hyperparameter overrides."""
    if pretrained:
        raise NotImplementedError("loading weights is not available yet")
    return build_model(get_spec(name), **overrides)
