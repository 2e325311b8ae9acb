"""Encoders (one file per architecture), the SimMIM method and the classifier."""

from .classifier import Classifier
from .features import FeatureMaps
from .simmim import SimMIM, SimMIMOutput, masked_reconstruction_loss
from .swin import SwinConfig, SwinTransformer
from .swinv2 import SwinTransformerV2, SwinV2Config
from .vit import VisionTransformer, ViTConfig

__all__ = ["Classifier", "FeatureMaps", "SimMIM", "SimMIMOutput", "SwinConfig", "SwinTransformer", "SwinTransformerV2",
           "SwinV2Config", "ViTConfig", "VisionTransformer", "masked_reconstruction_loss"]
