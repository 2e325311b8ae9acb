"""What the study runs: its parts' sizes, seeds and overrides."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

CLOTHING = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Shirt")
FOOTWEAR_AND_BAGS = ("Sandal", "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class DomainSettings:
    """The continuation part (`--only continue`): pretrain on one domain of Fashion-MNIST, then adapt
    to another with few unlabelled images and fewer labels."""

    source: tuple[str, ...] = CLOTHING
    """The first domain's classes: its training images pretrain the model every arm but scratch starts from."""
    target: tuple[str, ...] = FOOTWEAR_AND_BAGS
    """The second domain's classes: fine-tuned, probed and tested on."""
    source_epochs: int = 2
    """Pretraining epochs on the first domain's training images."""
    target_images: int = 4000
    """Unlabelled images of the second domain (the first of its training split; data.max_images, which also
    caps its test images); its labelled subset is drawn from the whole training split, as data.max_images
    cuts after data.labels_per_class."""
    target_epochs: int = 10
    """Epochs of the continuation on them, and of the pretraining on them alone (the same steps)."""
    budget: tuple[str, int, int] = ("100-per-class", 100, 60)
    """(name, labels per class of the second domain, fine-tuning epochs), the same for every arm."""


@dataclass(frozen=True)
class StudySettings:
    out: Path = Path("docs/results")
    work: Path = Path("runs/study")
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[tuple[str, int, int], ...] = (("1%", 60, 100), ("10%", 600, 60))
    """(name, labels per class, fine-tuning epochs): long enough for both arms to flatten (docs/results/
    README.md shows each run's last-interval change)."""
    pretrain_lengths: tuple[int, ...] = (1, 3, 6)
    """Pretraining epochs of the length curve (seed 0, probed and fine-tuned at the first budget)."""
    probe_val_images: int | None = None
    """Validation images the probes classify; None: all of them (Fashion-MNIST's 10,000 test images)."""
    ablation_pretrain_epochs: int = 1
    """Ablations pretrain this long (the baseline of the ablation table too), fine-tune at 1%."""
    ablations: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(table row, overrides of the pretraining); see ABLATIONS."""
    extra: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("fp32", "bf16")
    """The precision part: the demo's recipe at each of these, per seed."""
    precision_budget: tuple[str, int, int] | None = None
    """The precision part's (name, labels per class, fine-tuning epochs); None: the demo's."""
    domains: DomainSettings = field(default_factory=DomainSettings)
    """The continuation part's domains and sizes."""
    only: str | None = None
    """'main' or 'ablations' runs just that part and writes no report (two processes or machines can
    share the work and results.jsonl); None runs what is missing of both and writes the report.
    'precision' runs the demo at each precision per seed and writes precision.md; 'continue' runs the
    continuation part and writes continue.md (neither is part of None: they answer other questions)."""


# the paper's ablations at 48 px
ABLATIONS = (
    ("mask ratio 0.1", ("mask.ratio=0.1",)),
    ("mask ratio 0.3", ("mask.ratio=0.3",)),
    ("mask ratio 0.6 (paper)", ()),
    ("mask ratio 0.9", ("mask.ratio=0.9",)),
    ("mask patch 4 px (1/12 of the side)", ("mask.patch_size=4",)),
    ("mask patch 16 px (1/3 of the side)", ("mask.patch_size=16",)),
    ("2-layer MLP head", ("model.decoder=mlp",)),
    ("L2 loss", ("model.loss=l2",)),
)


def quick(s: StudySettings) -> StudySettings:
    """A smoke-sized study (tests): two seeds, one budget, two ablations, two pretraining lengths, small
    subsets, short runs."""
    domains = replace(s.domains, source_epochs=1, target_images=32, target_epochs=1, budget=("4-per-class", 4, 2))
    return replace(s, seeds=(0, 1), budgets=(("1%", 3, 2),), precision_budget=("demo", 3, 2), ablations=ABLATIONS[2:4],
                   pretrain_lengths=(1, 2), domains=domains,
                   extra=s.extra + ("data.max_images=64", "data.heldout_images=16", "data.batch_size=16",
                                    "runtime.tensorboard=false", "runtime.vis_every=0"))
