"""Encoders (one file per architecture), the SimMIM method and the classifier."""

from .classifier import Classifier
from .simmim import SimMIM, SimMIMOutput, masked_reconstruction_loss
from .swin import SwinConfig, SwinTransformer
from .vit import VisionTransformer, ViTConfig

__all__ = ["Classifier", "SimMIM", "SimMIMOutput", "SwinConfig", "SwinTransformer", "ViTConfig",
           "VisionTransformer", "masked_reconstruction_loss"]
