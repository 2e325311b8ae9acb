"""Real photographs bundled inside scikit-image, usable offline as a tiny unlabeled pretraining set."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from skimage import data

from ..errors import UsageError

# Only images shipped in the scikit-image wheel itself: the others need pooch and network access.
# Synthetic images (logo, colorwheel, checkerboard) and scanned text pages are left out on purpose.
_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": data.astronaut,
    "chelsea": data.chelsea,
    "coffee": data.coffee,
    "hubble_deep_field": data.hubble_deep_field,
    "immunohistochemistry": data.immunohistochemistry,
    "motorcycle": lambda: data.stereo_motorcycle()[0],
    "retina": data.retina,
    "rocket": data.rocket,
    # Grayscale photographs, returned as RGB with the gray copied to every channel.
    "brick": data.brick,
    "camera": data.camera,
    "coins": data.coins,
    "grass": data.grass,
    "gravel": data.gravel,
    "moon": data.moon,
}

PHOTOS: tuple[str, ...] = tuple(_LOADERS)


def load_photo(name: str) -> Image.Image:
    """The scikit-image photograph `name` (one of `PHOTOS`) as an RGB PIL image."""
    if name not in _LOADERS:
        raise UsageError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    return Image.fromarray(_LOADERS[name]()).convert("RGB")
