"""What several test modules share, as fixtures: test modules import nothing from each other."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.checkpoint import training as ckpt
from simmim.runtime import run_local_torchrun

torch.set_num_threads(min(2, os.cpu_count() or 1))

_SRC = Path(__file__).resolve().parents[1] / "src"
_DEVICE = torch.device(os.environ.get("SIMMIM_TEST_DEVICE", "cpu"))
if _DEVICE.type == "cuda":  # TF32 matmuls and convolutions differ from float32 by ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: other jobs share this machine's cores, and one thread per
    process is steadier than two (modules that train use it for every test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the comparisons against the reference implementations run: the CPU, or the device
    SIMMIM_TEST_DEVICE names (benchmarks/gpu_check.sh: cuda)."""
    return _DEVICE


def _randomize(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = name.endswith("weight") and "norm" in name.split(".")[-2:][0]
            p.normal_(1.0 if is_norm_scale else 0.0, std)
    return module


@pytest.fixture(scope="session")
def randomize() -> Callable[..., torch.nn.Module]:
    """randomize(module, std=0.05) fills every parameter with noise (norm scales around 1) and returns
    the module, so that zero-initialised tables, biases and tokens all matter in a comparison."""
    return _randomize


def _make_image_folder(root: Path, train_per_class: int = 8, val_per_class: int = 3, size: int = 72) -> Path:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.5, 1.0, size)[:, None, None]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, color in enumerate(((200, 60, 60), (60, 60, 200))):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.asarray(color, dtype=np.float64) * ramp + rng.normal(0, 25, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder() -> Callable[..., Path]:
    """image_folder(root, train_per_class=8, val_per_class=3, size=72) writes train/ and val/ with two
    easily told apart classes (reddish and bluish noisy gradients) under root and returns root: the
    data of the training tests, the same pixels on every call."""
    return _make_image_folder


def _settings(task: str, data: Path | str, out: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", f"out_dir={out}", "data.batch_size=4", "data.num_workers=0", "runtime.threads=1",
            "runtime.log_every=1",
            "runtime.tensorboard=false", "runtime.vis_every=0", "schedule.warmup_epochs=0", *extra]


@pytest.fixture(scope="session")
def settings() -> Callable[..., list[str]]:
    """settings(task, data, out, *extra): config overrides for a tiny, quiet, single-worker run."""
    return _settings


def _hub_repo(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture(scope="session")
def hub_repo() -> Callable[..., Path]:
    """hub_repo(cache, repo, commit, files, refs=("main",)) writes one commit of a Hugging Face Hub
    repository into a cache in huggingface_hub's own layout (what hf_hub_download reads offline):
    blobs/<sha256>, refs/<ref> holding the commit hash, snapshots/<commit>/<file> linking to its blob."""
    return _hub_repo


@pytest.fixture(scope="session")
def no_augment() -> tuple[str, ...]:
    """Overrides for deterministic crops: the whole image, no flip."""
    return "augment.crop_scale=1,1", "augment.crop_ratio=1,1", "augment.hflip=0"


@pytest.fixture(scope="session")
def params_of() -> Callable[[Path], dict[str, torch.Tensor]]:
    """params_of(checkpoint): the model weights a training checkpoint holds, to compare runs."""
    return lambda path: ckpt.load(path)["model"]


@pytest.fixture(scope="session")
def src_env() -> Callable[..., dict[str, str]]:
    """src_env(**extra): this process's environment (as it is at the call) with this tree's src/
    first on PYTHONPATH and `extra` on top, so that a subprocess runs the package under test."""

    def env(**extra: str) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(_SRC), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path, **extra}

    return env


_LAUNCHER = """\
import sys
from simmim.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def torchrun(tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """torchrun(nproc, *argv, launcher=None): `nproc` CPU processes of a script (by default one that
    runs the training commands, written into tmp_path) with `argv`, output captured."""

    def run(nproc: int, *argv: str, launcher: Path | None = None) -> subprocess.CompletedProcess:
        if launcher is None:
            launcher = tmp_path / "launch.py"
            launcher.write_text(_LAUNCHER)
        return run_local_torchrun(nproc, [str(launcher), *argv], timeout=300)

    return run
