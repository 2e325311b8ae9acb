"""The README runs as printed: every ```python block and every command of every ```bash block, in the
order printed (later blocks use what earlier ones wrote), in one scratch folder; and its Layout section
names every module of the package.

What a test cannot have is stood in for, by the tables below (each entry says why):
- published models: tiny ones with the same code paths (NAMES; seconds instead of minutes on a CPU);
- published weights (a download) and checkpoint files the README names: random weights of the
  (tiny) architecture, written where the file is expected; Hub repositories: such weights in HF's
  layout, in an offline Hub cache;
- /data/imagenet, fashion-mnist and other data: a tiny generated folder with train/ and val/ classes;
- training commands: the zoo presets become the tiny `nano-*` ones, one epoch of batch 4, quiet;
- `<step>` in a path: the newest file that matches.
Commands that need several processes, a GPU or installing packages are skipped with the reason.
New README sections are picked up by themselves; a command the tables do not cover fails here."""

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import simmim
from simmim.checkpoint.formats import HF
from simmim.checkpoint.io import atomic_save_safetensors
from simmim.cli import main
from simmim.zoo import get_spec, sources

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(python|bash)\n(.*?)^```", README, re.M | re.S)

# published model -> tiny stand-in of the same kind (and the input size the README gives it)
NAMES = {
    "simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px": "simmim_swin-nano_test-64px",
    "swin-base-w6_simmim-100e-pre_8xb256-coslr-100e_in1k-192px": "swin-nano_test-64px",
    "swinv2_base_1k_500k": "simmim_swinv2-nano_test-64px",
    "swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in1k": "swin-nano_test-64px",
    "simmim_swinv2-G-w12_in22k-ext-192px": "simmim_swinv2-nano_test-64px",  # a 3B model's plan: 2 min here
    "torch.randn(2, 3, 192, 192)": "torch.randn(2, 3, 64, 64)",
}
# checkpoint files the README loads, and the architecture of their random stand-ins
FILES = {
    "simmim_pretrain__swin_base__img192_window6__100ep.pth": "simmim_swin-nano_test-64px",
    "simmim_swinv2-nano_test-64px.pth": "simmim_swinv2-nano_test-64px",  # swinv2_base_1k_500k.pth
    "swin_base_finetune.pth": "swin-nano_test-64px",  # a published classifier (official layout)
}
# Hub repositories the README loads from (offline, from a cache the test writes)
HUB_REPOS = ("microsoft/swin-base-simmim-window6-192",)
# training commands run at tiny size: the presets of big models become the tiny ones with the same task
PRESETS = {
    "simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px": "nano-pretrain",
    "simmim_pretrain__swin_base__img192_window6__100ep": "nano-pretrain",
    "swin-base-w6_simmim-100e-pre_8xb256-coslr-100e_in1k-192px": "nano-finetune",
}
TRAINING = ("pretrain", "finetune")
FAST = ["--epochs", "1", "--batch-size", "4", "--set", "data.num_workers=0", "--set", "runtime.threads=1",
        "--set", "runtime.tensorboard=false", "--set", "runtime.vis_every=0"]
DATA = ("/data/imagenet", "fashion-mnist", "DIR")  # data arguments: the tiny folder stands in
SKIPS = {  # a command matching one of these patterns is not run, for the reason given
    r"^make ": "creates the environment, then runs the demo or the whole suite (minutes)",
    r"^pip install": "installs into the environment",
    r"^torchrun ": "several processes or GPUs (tests/test_distributed.py and test_sharded.py run them at 2)",
    r"^simmim (pretrain --out runs/swinl|consolidate runs/swinl)": "continues the torchrun run above",
    r"^simmim export-dataset fashion-mnist": "needs the Fashion-MNIST files (tests/test_webdataset.py exports shards)",
    r"^simmim pretrain .*\.tar\b": "reads the shards of the export above",
    r"^simmim plan .*--check": "measures small models' peaks in 2 processes (minutes; tests/test_plan.py)",
}


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    return [c for c in (" ".join(shlex.split(line, comments=True)) for line in block.replace("\\\n", " ").splitlines())
            if c]


def stand_in(text: str) -> str:
    for published, tiny in NAMES.items():
        text = text.replace(published, tiny)
    return text


def stand_in_argv(command: str, data: Path) -> list[str]:
    """The command's arguments with the stand-ins of the tables above."""
    argv = shlex.split(command)[1:]
    if argv[0] in TRAINING:
        # a zoo name after --preset is its recipe; elsewhere (--pretrained NAME) its weights
        argv = [PRESETS.get(a, a) if before == "--preset" else a
                for before, a in zip(["", *argv[:-1]], argv, strict=True)] + FAST
    argv = [stand_in(a) for a in argv]
    newest = [sorted(Path().glob(a.replace("<step>", "*")))[-1].as_posix() if "<step>" in a else a for a in argv]
    return [str(data) if a in DATA else a for a in newest]


@pytest.fixture
def scratch(tmp_path, monkeypatch, image_folder, hub_repo):
    """A working folder with the stand-ins; the tiny models "publish" random weights."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMMIM_CACHE", str(tmp_path / "cache"))
    for file, name in FILES.items():  # a classifier file: one fine-tuned on the tiny folder's two classes
        classes = {"num_classes": 2} if get_spec(name).task == "classification" else {}
        torch.save({"model": simmim.get_model(name, **classes).state_dict()}, tmp_path / file)

    def published(name: str):
        spec = get_spec(name)
        return dataclasses.replace(spec, weights=spec.weights or f"stand-in:{spec.name}")

    def download(url: str, cache=None) -> Path:
        name = url.removeprefix("stand-in:")
        path = tmp_path / f"published-{name}.pth"
        torch.save({"model": simmim.get_model(name).state_dict()}, path)
        return path

    monkeypatch.setattr(sources, "get_spec", published)
    monkeypatch.setattr(sources, "download", download)
    # Hub repositories the README names: a tiny model in HF's layout, in an offline Hub cache
    weights = tmp_path / "hub-weights.safetensors"
    atomic_save_safetensors(HF.from_ours(simmim.get_model("simmim_swin-nano_test-64px").state_dict()), weights)
    for repo in HUB_REPOS:
        hub_repo(tmp_path / "hf-cache", repo, "0" * 40, {"model.safetensors": weights.read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return image_folder(tmp_path / "data", train_per_class=4, val_per_class=2, size=64)


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPS.items() if re.search(pattern, command)), None)


def run_shell_block(block: str, src_env) -> None:
    """A block that is a shell script (a server started, curl, kill) runs as one, with this
    environment's `simmim` and `python` first on the PATH; whatever it left running is ended."""
    env = src_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", "-ec", stand_in(block)], env=env, start_new_session=True)
    try:
        assert proc.wait(timeout=300) == 0, f"README shell block failed: {block.splitlines()[0]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_every_block_of_the_readme_runs(scratch, capsys, src_env):
    namespace: dict = {}
    ran, skipped = 0, []
    for kind, block in BLOCKS:
        if kind == "python":
            start = time.perf_counter()
            exec(compile(stand_in(block), "README.md", "exec"), namespace)
            print(f"README timing {time.perf_counter() - start:.1f} s: python block {block.splitlines()[0]}")
            ran += 1
            continue
        if any(not c.startswith("simmim ") and not skip_reason(c) for c in commands(block)):
            run_shell_block(block, src_env)
            ran += 1
            continue
        for command in commands(block):
            reason = skip_reason(command)
            if reason:
                skipped.append(command)
                continue
            assert command.startswith("simmim "), f"README command without a stand-in: {command}"
            start = time.perf_counter()
            assert main(stand_in_argv(command, scratch)) == 0, f"README command failed: {command}"
            print(f"README timing {time.perf_counter() - start:.1f} s: {command}")
            ran += 1
    assert ran >= 12 and len(skipped) < ran  # the blocks were found


def test_layout_lists_every_module_and_only_existing_ones():
    """A folder whose line names files must name all of its modules; one described in words (bench/,
    plan/) is taken as a whole; every top-level module is named."""
    layout = re.search(r"^## Layout\n\n```\n(.*?)^```", README, re.M | re.S).group(1)
    package = ROOT / "src" / "simmim"
    listed: dict[str, set[str]] = {"": set()}  # folder ("" = top level) -> the files named in its lines
    folder = ""
    for line in layout.splitlines()[1:]:
        head = re.match(r"  (\w+)/", line)
        if head:
            folder = head.group(1)
            listed[folder] = set()
        elif re.match(r"  \S", line):
            folder = ""
        listed[folder] |= set(re.findall(r"\b(\w+\.py)\b", line))
    modules: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            modules.setdefault(path.parent.relative_to(package).as_posix().replace(".", ""), set()).add(path.name)
    assert set(listed) == set(modules), "the Layout's folders differ from the package's"
    for name, files in listed.items():
        assert files <= modules[name], f"the Layout names {sorted(files - modules[name])} in {name or 'simmim'}/"
        if files or name == "":
            missing = sorted(modules[name] - files)
            assert not missing, f"the Layout leaves out {missing} in {name or 'simmim'}/"


def test_readme_quotes_the_committed_study_and_precision_results():
    """The README's study figures are those of docs/results/ (a rerun of the study must update both)."""
    import json

    root = Path(__file__).resolve().parents[1]
    readme, results = (root / "README.md").read_text(), root / "docs" / "results"
    study = json.loads((results / "summary.json").read_text())

    def pm(stats: dict) -> str:
        return f"{stats['mean']:.2f} ± {stats['std']:.2f}"

    for label, row in study["finetune"].items():
        assert f"| {label} | " in readme and f"| {pm(row['scratch'])} | {pm(row['simmim'])} |" in readme, label
    for label, row in study["probe"].items():
        assert f"{pm(row['simmim linear'])} against {pm(row['random linear'])}" in readme, label
    for epochs, row in study["pretrain_length"].items():
        assert f"{row['finetune_top1']:.2f}" in readme, epochs
    precision = json.loads((results / "precision.json").read_text())
    for name in ("fp32", "bf16"):
        assert f"{precision[name]['gap']['mean']:+.2f} ± {precision[name]['gap']['std']:.2f}" in readme, name
    # the continuation part (`simmim study --only continue`) once its results are committed: its table's rows
    continuation = results / "continue.json"
    if continuation.is_file():
        from simmim.study.domains import ARMS

        arms = json.loads(continuation.read_text())["arms"]
        for arm, row in arms.items():
            assert f"| {ARMS[arm]} | {pm(row['finetune'])} | {pm(row['knn'])} | {pm(row['linear'])} |" in readme, arm


def test_readme_quotes_the_committed_detection_study():
    """The README's detection table is docs/results/detection.json's (a rerun of the study must update both)."""
    import json

    root = Path(__file__).resolve().parents[1]
    table = json.loads((root / "docs" / "results" / "detection.json").read_text())["table"]
    readme = (root / "README.md").read_text()
    for arm, label in (("simmim", "SimMIM-pretrained"), ("random", "random weights")):
        row = " | ".join(f"{table[arm][k]['mean']:.2f} ± {table[arm][k]['std']:.2f}"
                         for k in ("bbox_map", "bbox_map_50", "segm_map", "miou"))
        assert f"| {label} | {row} |" in readme, arm
