"""Bad input gets a one-line error (exit status 2), never a traceback; random bytes as images and
random config values end in a clean error or a skip, never a crash."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from simmim.cli import main
from simmim.config import all_keys, load_config
from simmim.data.datasets import UnreadableImage, load_rgb


@pytest.fixture(scope="module")
def data(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp("data"), train_per_class=2, val_per_class=1)


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("simmim: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["pretrain", "--preset", "nano-pretrain", "--data", "{tmp}/missing"], "no image folder or list file at"),
    (["pretrain", "--preset", "nano-pretrain", "--data", "{tmp}/empty"], "no images found"),
    (["finetune", "--preset", "nano-finetune", "--data", "{tmp}/empty"], "not found; expected"),
    (["pretrain", "--preset", "nano-pretrian", "--data", "{data}"], "did you mean 'nano-pretrain'"),
    (["predict", "swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in", "x.png"], "did you mean swin-base-w7"),
    (["pretrain", "--preset", "nano-pretrain", "--data", "{data}", "--set", "optim.wieght_decay=1"],
     "did you mean 'optim.weight_decay'"),
    (["pretrain", "--preset", "nano-pretrain", "--data", "{data}", "--set", "mask.patch_size=24"],
     "mask_patch_size=24 must divide input_size=64"),
    (["pretrain", "--preset", "nano-pretrain", "--data", "{data}", "--set", "mask.patch_size=18",
      "--set", "model.img_size=72"], "multiple of the model's patch size 4"),
    (["pretrain", "--preset", "nano-pretrain", "--data", "{data}", "--set", "mask.ratio=1.2"], "mask.ratio: expected"),
    (["pretrain", "--preset", "nano-pretrain", "--data", "{data}", "--set", "model.window_size=40"],
     "window_size=40: expected 1 to 16"),
    (["finetune", "--preset", "nano-finetune", "--data", "{data}", "--batch-size", "5"], "even size with mixup"),
    (["pretrain", "--preset", "nano-pretrain", "--data", "{data}", "--batch-size", "64"], "fewer than one step"),
    (["evaluate", "{tmp}/junk.pt", "--data", "{data}"], "not a PyTorch/safetensors checkpoint"),
    (["finetune", "--preset", "nano-finetune", "--data", "{data}", "--pretrained", "{tmp}/vit.pt"],
     "does not fit this classifier: missing"),
    (["verify-data", "{tmp}/missing"], "no image folder or list file at"),
])
def test_bad_input_is_one_line_with_exit_status_2(argv, expected, data, tmp_path, capsys):
    import torch

    import simmim

    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"\x00junk" * 10)
    torch.save({"model": simmim.get_model("simmim_vit-nano_test-64px").state_dict()}, tmp_path / "vit.pt")
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    argv += ["--out", str(tmp_path / "run")] if argv[0] in ("pretrain", "finetune") else []
    assert expected in _error_line(capsys, argv)
    assert not (tmp_path / "run").exists()  # a run that cannot start leaves no folder


@pytest.mark.parametrize("batch", [1, 16])
def test_a_folder_of_unreadable_images_is_one_line_naming_it(tmp_path, capsys, batch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.png").write_bytes(b"not an image")
    err = _error_line(capsys, ["pretrain", "--preset", "nano-pretrain", "--data", str(bad), "--batch-size", str(batch),
                               "--out", str(tmp_path / "run"), "--set", "data.num_workers=0"])
    assert f"{bad}: none of its 1 images could be decoded (1 skipped;" in err and "fewer than" not in err
    assert not (tmp_path / "run").exists()


def test_model_settings_and_config_keys_are_refused_naming_the_valid_ones():
    import simmim

    with pytest.raises(ValueError, match="loss 'l3': expected 'l1' or 'l2'"):
        simmim.get_model("simmim_swin-nano_test-64px", loss="l3")
    with pytest.raises(ValueError) as err:  # no close match: the valid keys of the section, not a folder
        load_config("nano-pretrain", overrides=["optim.zzzzzzzzzzzzzzzzzzzzzzzz=1"])
    message = str(err.value)
    assert "configs/" not in message and "optim.lr" in message and "optim.weight_decay" in message
    with pytest.raises(ValueError) as err:
        load_config("nano-pretrain", overrides=["zzzzzzzzzzzzzzzzzzzz=1"])
    assert "configs/" not in str(err.value) and "optim" in str(err.value) and "runtime" in str(err.value)


@pytest.mark.parametrize("bug", [TypeError("unsupported operand type(s)"), KeyError("stage"),
                                 ValueError("too many values to unpack")])
def test_a_bug_is_a_traceback_and_exit_status_1_not_a_usage_error(bug, monkeypatch, capsys):
    import simmim.cli

    def broken(args):
        raise bug

    monkeypatch.setattr(simmim.cli, "_models", broken)  # build_parser mounts the patched function
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "simmim: error:" not in err and "Traceback (most recent call last)" in err, err
    assert f"{type(bug).__name__}: " in err and err.rstrip().endswith(simmim.cli.BUG_HINT)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "verify-data", str(tmp_path / "missing")])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=4096), header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
                                                                 b"GIF89a", b"BM"]),
       suffix=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp"]))
def test_random_bytes_as_images_decode_or_are_skipped(tmp_path, payload, header, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(header + payload)
    try:
        image = load_rgb(path)
    except UnreadableImage as err:
        assert err.path == str(path) and "\n" not in err.reason
    else:
        assert isinstance(image, Image.Image) and image.mode == "RGB"


VALUES = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str),
                   st.text(string.printable, max_size=12), st.sampled_from(["none", "true", "1,2", "[1, 2]", ""]))


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(all_keys()), value=VALUES, task=st.sampled_from(["nano-pretrain", "nano-finetune"]))
def test_random_config_values_give_a_clean_error_or_a_config(key, value, task):
    try:
        cfg = load_config(task, overrides=[f"{key}={value}"])
    except ValueError as err:
        assert "\n" not in str(err) and key.split(".")[-1] in str(err) or "task" in str(err), str(err)
    else:
        assert load_config(base=cfg.to_dict()).to_dict() == cfg.to_dict()


def test_too_many_labels_per_class_name_the_key(data):
    from simmim.engine.builders import labelled_source

    with pytest.raises(ValueError, match=r"^data\.labels_per_class: class \d+ has 2 images, fewer than the 5 asked"):
        labelled_source(str(data), "train", 5)
