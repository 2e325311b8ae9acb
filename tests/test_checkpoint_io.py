"""Tests for atomic checkpoint saving, weights-only loading and published-hash checks."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch

from simmim import fsutil
from simmim.checkpoint.io import (
    UnsafeCheckpointError,
    atomic_save,
    atomic_save_safetensors,
    check_hash_in_name,
    load_checkpoint_file,
    sha256_prefix_matches,
    strip_prefixes,
)


def _leftovers(directory: Path, keep: str) -> list[str]:
    """Files in `directory` other than `keep` (i.e. temp files a failed save left behind)."""
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def _official_style(config: object) -> dict:
    """A small checkpoint laid out like microsoft/SimMIM `save_checkpoint` output."""
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.999))
    param.sum().backward()
    opt.step()
    model = OrderedDict(
        [
            ("encoder.layers.0.blocks.0.attn.relative_position_bias_table", torch.randn(121, 4)),
            ("encoder.layers.0.blocks.0.attn.relative_position_index", torch.arange(36 * 36).view(36, 36)),
            ("decoder.0.weight", torch.randn(48, 8, 1, 1)),
        ]
    )
    return {
        "model": model,
        "optimizer": opt.state_dict(),
        "lr_scheduler": {"t_initial": 100, "base_values": [1e-3]},
        "max_accuracy": 0.0,
        "epoch": 99,
        "config": config,
    }


def _assert_same(loaded: dict, saved: dict) -> None:
    """Compare the tensor and plain parts of an official-style checkpoint."""
    assert list(loaded["model"]) == list(saved["model"])
    for key, value in saved["model"].items():
        torch.testing.assert_close(loaded["model"][key], value, rtol=0, atol=0)
    torch.testing.assert_close(loaded["optimizer"], saved["optimizer"], rtol=0, atol=0)
    assert loaded["epoch"] == 99 and loaded["lr_scheduler"] == saved["lr_scheduler"]


# --- saving ------------------------------------------------------------------------------------------


def test_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    obj = {"model": OrderedDict(w=torch.randn(3, 3)), "epoch": 3, "names": ["a", "b"], "pair": (1, 2.5)}
    atomic_save(obj, path)
    atomic_save(obj, path)  # overwriting an existing file goes through the same rename
    loaded = load_checkpoint_file(path)
    torch.testing.assert_close(loaded["model"]["w"], obj["model"]["w"], rtol=0, atol=0)
    assert isinstance(loaded["model"], OrderedDict)
    assert (loaded["epoch"], loaded["names"], loaded["pair"]) == (3, ["a", "b"], (1, 2.5))
    assert _leftovers(tmp_path, "ckpt.pth") == []


def test_failed_rename_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pth"
    atomic_save({"v": torch.tensor(1)}, path)

    def crash(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="could not save checkpoint .*ckpt.pth: Input/output error"):
        atomic_save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path)["v"].item() == 1
    assert _leftovers(tmp_path, "ckpt.pth") == []


def test_crash_mid_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pth"
    atomic_save({"v": torch.tensor(1)}, path)

    def half_written_save(obj: object, file: object) -> None:
        file.write(b"PK\x03\x04 partial zip")  # type: ignore[attr-defined]
        raise RuntimeError("process interrupted\nsecond line")

    monkeypatch.setattr(torch, "save", half_written_save)
    with pytest.raises(RuntimeError) as info:
        atomic_save({"v": torch.tensor(2)}, path)
    assert str(info.value) == f"could not save checkpoint {path}: RuntimeError: process interrupted"
    monkeypatch.undo()
    assert load_checkpoint_file(path)["v"].item() == 1
    assert _leftovers(tmp_path, "ckpt.pth") == []


def _partial_temp_exists(directory: Path, min_bytes: int) -> bool:
    """Whether a save's temp file in `directory` has at least `min_bytes` written."""
    for tmp in directory.glob(".*.tmp"):
        try:
            if tmp.stat().st_size >= min_bytes:
                return True
        except FileNotFoundError:  # renamed into place meanwhile
            continue
    return False


def test_sigkill_during_save_leaves_a_loadable_file(tmp_path: Path, src_env) -> None:
    path = tmp_path / "ckpt.pth"
    child = textwrap.dedent(
        """
        import sys, torch
        from simmim.checkpoint.io import atomic_save
        for i in range(1, 10_000):
            print(i, flush=True)
            atomic_save({"i": i, "w": torch.full((2_000_000,), float(i))}, sys.argv[1])
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(path)], stdout=subprocess.PIPE, text=True, env=src_env()
    )
    try:
        assert proc.stdout is not None
        # Line 3 means saves 1 and 2 are complete and save 3 (8 MB) has just started.
        for line in proc.stdout:
            if int(line) >= 3:
                break
        # Kill once a temp file holds some of the 8 MB, i.e. in the middle of writing it.
        deadline = time.monotonic() + 20
        while not _partial_temp_exists(tmp_path, 1 << 20) and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -9
    loaded = load_checkpoint_file(path)
    assert loaded["i"] >= 2
    assert torch.equal(loaded["w"], torch.full((2_000_000,), float(loaded["i"])))


class _FullDisk:
    """A file that fails with ENOSPC once `budget` bytes have been written."""

    def __init__(self, file, budget: int) -> None:
        self._file, self._left = file, budget

    def write(self, data: bytes) -> int:
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _full_disk_open(*args: object, **kwargs: object) -> _FullDisk:
    """`open` for a disk with 4 KiB free."""
    return _FullDisk(open(*args, **kwargs), 4096)  # noqa: SIM115 - the caller's `with` closes it


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_disk_full_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    path = tmp_path / f"ckpt.{'pth' if fmt == 'torch' else 'safetensors'}"
    old, new = {"w": torch.zeros(4)}, {"w": torch.ones(100_000)}

    def save(tensors: dict) -> None:
        if fmt == "torch":
            atomic_save(tensors, path)
        else:
            atomic_save_safetensors(tensors, path)

    save(old)
    # Only the module's own `open` is replaced, so torch and safetensors internals are untouched.
    monkeypatch.setattr(fsutil, "open", _full_disk_open, raising=False)
    with pytest.raises(OSError) as info:
        save(new)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message and "\n" not in message
    torch.testing.assert_close(load_checkpoint_file(path)["w"], old["w"], rtol=0, atol=0)
    assert _leftovers(tmp_path, path.name) == []


def test_disk_full_at_fsync_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pth"
    atomic_save({"v": torch.tensor(1)}, path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path)["v"].item() == 1
    assert _leftovers(tmp_path, "ckpt.pth") == []


def test_a_json_cache_keeps_other_writers_entries_and_outlives_damage(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "figures.json"
    assert fsutil.read_json_cache(path) == {}  # none yet
    fsutil.update_json_cache(path, {"a": 1}, "test cache")
    seen = fsutil.read_json_cache(path)
    fsutil.update_json_cache(path, {"b": 2}, "test cache")  # another process, since `seen` was read
    fsutil.update_json_cache(path, {**seen, "c": 3}, "test cache")
    assert json.loads(path.read_text()) == {"a": 1, "b": 2, "c": 3}
    for damaged in ('{"a": 1', "[1, 2]", ""):
        path.write_text(damaged)
        assert fsutil.read_json_cache(path) == {}
    path.parent.chmod(0o500)  # unwritable: skipped, the work is only done again
    try:
        fsutil.update_json_cache(path, {"d": 4}, "test cache")
    finally:
        path.parent.chmod(0o700)
    assert os.geteuid() == 0 or path.read_text() == ""
    assert [p.name for p in path.parent.iterdir()] == ["figures.json"]  # no temp file left


def test_safetensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(5, dtype=torch.int64)}
    atomic_save_safetensors(tensors, path, metadata={"format": "pt", "epoch": "7"})
    loaded = load_checkpoint_file(path)
    assert set(loaded) == {"a", "b"}
    for key, value in tensors.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "epoch": "7"}
    # Recognised by content too, whatever the extension.
    renamed = path.rename(tmp_path / "model.bin")
    torch.testing.assert_close(load_checkpoint_file(renamed)["a"], tensors["a"], rtol=0, atol=0)


# --- loading safely ----------------------------------------------------------------------------------


class _SystemPayload:
    """Unpickling this with plain pickle would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    """Unpickling this with plain pickle would exec Python code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    ("payload", "refused"), [(_SystemPayload, "system"), (_ExecPayload, "builtins.exec")]
)
@pytest.mark.parametrize("container", ["torch.save", "bare pickle"])
def test_code_execution_payload_is_refused(
    tmp_path: Path, payload: type, refused: str, container: str
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.ones(1)}, "extra": payload(marker)}
    if container == "torch.save":
        torch.save(obj, path)
    else:  # the legacy loader path: the file is one pickle stream
        path.write_bytes(pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message and refused in message and "not executed" in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def _install_fake_yacs(monkeypatch: pytest.MonkeyPatch, marker: Path) -> type:
    """Put a `yacs.config` module with a CfgNode look-alike in sys.modules; its code touches `marker`."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init: dict | None = None) -> None:
            super().__init__(init or {})
            # Like yacs: instance state that pickle stores next to the dict items.
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()

        def __setstate__(self, state: dict) -> None:
            marker.touch()
            self.__dict__.update(state)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode  # type: ignore[attr-defined]
    package = types.ModuleType("yacs")
    package.config = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


def _block_yacs_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import yacs` fail, proving the loader never imports it."""
    monkeypatch.setitem(sys.modules, "yacs", None)
    monkeypatch.setitem(sys.modules, "yacs.config", None)


def test_official_checkpoint_with_fake_yacs_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "yacs_code_ran"
    cfg_node = _install_fake_yacs(monkeypatch, marker)
    config = cfg_node({"MODEL": cfg_node({"TYPE": "swin", "SWIN": cfg_node({"DEPTHS": [2, 2, 18, 2]})})})
    config["TRAIN"] = cfg_node({"BASE_LR": 8e-4, "BETAS": (0.9, 0.999)})
    saved = _official_style(config)
    path = tmp_path / "simmim_pretrain__swin_base__img192_window6__800ep.pth"
    torch.save(saved, path)
    _block_yacs_import(monkeypatch)
    loaded = load_checkpoint_file(path)
    assert loaded["config"] == {
        "MODEL": {"TYPE": "swin", "SWIN": {"DEPTHS": [2, 2, 18, 2]}},
        "TRAIN": {"BASE_LR": 8e-4, "BETAS": (0.9, 0.999)},
    }
    assert type(loaded["config"]) is dict and type(loaded["config"]["MODEL"]["SWIN"]) is dict
    _assert_same(loaded, saved)
    assert not marker.exists()


def test_official_checkpoint_with_real_yacs_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yacs_config = pytest.importorskip("yacs.config")
    config = yacs_config.CfgNode()
    config.MODEL = yacs_config.CfgNode()
    config.MODEL.TYPE = "vit"
    config.MODEL.VIT = yacs_config.CfgNode({"EMBED_DIM": 768, "USE_SHARED_RPB": True})
    config.DATA = yacs_config.CfgNode({"IMG_SIZE": 224, "MASK_RATIO": 0.6})
    config.freeze()
    saved = _official_style(config)
    path = tmp_path / "ckpt_epoch_99.pth"
    torch.save(saved, path)
    _block_yacs_import(monkeypatch)
    loaded = load_checkpoint_file(path)
    assert loaded["config"] == {
        "MODEL": {"TYPE": "vit", "VIT": {"EMBED_DIM": 768, "USE_SHARED_RPB": True}},
        "DATA": {"IMG_SIZE": 224, "MASK_RATIO": 0.6},
    }
    assert type(loaded["config"]["MODEL"]) is dict
    _assert_same(loaded, saved)


def test_numpy_scalars_and_namespace_load_but_arrays_do_not(tmp_path: Path) -> None:
    path = tmp_path / "mm.pth"
    meta = {
        "seed": np.int64(5),
        "acc": np.float32(0.25),
        "dtype": np.dtype("float16"),
        "flag": np.bool_(True),
    }
    torch.save({"meta": meta, "state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    loaded = load_checkpoint_file(path)
    assert loaded["meta"] == meta and type(loaded["meta"]["seed"]) is np.int64
    assert loaded["args"] == argparse.Namespace(lr=0.1)
    torch.save({"meta": {"hist": np.arange(3)}}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"multiarray\._reconstruct"):
        load_checkpoint_file(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, this is a text file\n",
        bytes(np.random.default_rng(0).integers(1, 128, 4096, dtype=np.uint8)),  # no pickle/zip header
        b"PK\x03\x04" + bytes(200),  # zip signature, but not an archive torch can read
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",  # safetensors-shaped header that is not JSON
    ],
    ids=["empty", "text", "random", "broken-zip", "broken-safetensors"],
)
def test_non_checkpoints_are_rejected(tmp_path: Path, content: bytes) -> None:
    for name in ("x.pth", "x.safetensors"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match="is not a PyTorch/safetensors checkpoint") as info:
            load_checkpoint_file(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert not isinstance(info.value, UnsafeCheckpointError)


@pytest.mark.parametrize("keep", [lambda n: n - 10, lambda n: n // 2], ids=["all-but-10-bytes", "half"])
def test_truncated_checkpoint_is_rejected(tmp_path: Path, keep) -> None:
    path = tmp_path / "ckpt.pth"
    atomic_save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])
    with pytest.raises(ValueError, match="is not a PyTorch/safetensors checkpoint") as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint_file(path)


def test_non_dict_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(2), path)
    with pytest.raises(ValueError, match="holds a Tensor"):
        load_checkpoint_file(path)


# --- keys and hashes ---------------------------------------------------------------------------------


def test_strip_prefixes() -> None:
    state = {
        "module._orig_mod.encoder.a": 1,
        "_orig_mod.module.module.b": 2,
        "c": 3,
        "encoder.module.d": 4,  # only leading prefixes go
    }
    assert strip_prefixes(state) == {"encoder.a": 1, "b": 2, "c": 3, "encoder.module.d": 4}
    with pytest.raises(ValueError, match="collide"):
        strip_prefixes({"module.a": 1, "a": 2})


def test_hash_in_name(tmp_path: Path) -> None:
    data = b"pretend these are weights"
    digest = hashlib.sha256(data).hexdigest()
    good = tmp_path / f"simmim_swin-base_16xb128-amp-coslr-100e_in1k-192px_20220829-{digest[:8]}.pth"
    good.write_bytes(data)
    assert check_hash_in_name(good) is True
    assert sha256_prefix_matches(good, good.name) is True

    bad = tmp_path / "weights-0e15782d.pth"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="does not start with '0e15782d'") as info:
        check_hash_in_name(bad)
    assert "\n" not in str(info.value)
    assert sha256_prefix_matches(bad, bad.name) is False

    plain = tmp_path / "simmim_pretrain__swin_base__img192_window6__100ep.pth"
    plain.write_bytes(data)
    assert check_hash_in_name(plain) is False
    assert sha256_prefix_matches(plain, plain.name) is None

    # A cached download checked against the published name it came from.
    assert check_hash_in_name(plain, name=f"https://host/w-{digest[:10]}.safetensors") is True
