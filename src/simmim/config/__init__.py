"""Training recipes as typed configs: dataclass sections with a docstring per field (`schema`), loaded
from a YAML file or a named recipe (`recipes`), overridden with dotted keys such as `optim.lr=1e-4`
(`loading`), stored as plain data. Values are converted to each field's declared type (`values`)."""

from .loading import load_config, parse_override, task_overrides
from .recipes import PRESETS, preset, source_recipe
from .schema import (
    TASKS,
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainConfig,
    all_keys,
)
from .values import merge

__all__ = [
    "PRESETS", "TASKS", "AugmentConfig", "CheckpointConfig", "DataConfig", "EvalConfig", "MaskConfig", "ModelConfig",
    "OptimConfig", "RuntimeConfig", "ScheduleConfig", "TrainConfig", "all_keys", "load_config", "merge",
    "parse_override", "preset", "source_recipe", "task_overrides",
]
