"""Weights sources (`simmim.zoo.sources`): `hf-hub:` read offline from a Hub cache built in
huggingface_hub's own layout (revisions, files, its errors as one line), and downloads that leave
nothing under the final name when a transfer is cut short or the hash is wrong (a local HTTP server)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch

import simmim
from simmim.checkpoint.formats import HF
from simmim.checkpoint.io import atomic_save_safetensors
from simmim.cli import main
from simmim.data.photos import load_photo
from simmim.zoo import hub, sources

PRE, CLS = "simmim_swin-nano_test-64px", "swin-nano_test-64px"
REPO = "test-org/swin-nano-simmim"


def _hf_files(model: torch.nn.Module, tmp_path: Path) -> dict[str, bytes]:
    """An HF transformers repository's files for `model`: config.json and model.safetensors (HF layout)."""
    path = tmp_path / f"hf-{id(model)}.safetensors"
    atomic_save_safetensors(HF.from_ours(model.state_dict()), path, metadata={"format": "pt"})
    return {"config.json": json.dumps({"model_type": "swin"}).encode(), "model.safetensors": path.read_bytes()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, randomize, hub_repo):
    """An offline Hub cache with REPO at two commits: main (model A), tag v1 (model B, also as an
    official-layout .pth file); returns (A, B, the commit of v1)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = randomize(simmim.get_model(PRE)), randomize(simmim.get_model(PRE))
    hub_repo(cache, REPO, "a" * 40, _hf_files(a, tmp_path))
    torch.save({"model": b.state_dict()}, tmp_path / "b.pth")
    hub_repo(cache, REPO, "b" * 40, {**_hf_files(b, tmp_path), "official/b.pth": (tmp_path / "b.pth").read_bytes()},
              refs=("v1",))
    return a, b, "b" * 40


def _same(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_hf_hub_sources_load_offline_at_a_revision_and_a_file(hub_cache):
    a, b, commit = hub_cache
    assert _same(simmim.get_model(PRE, pretrained=f"hf-hub:{REPO}"), a)  # an HF repository, as an HF folder
    assert _same(simmim.get_model(PRE, pretrained=f"hf-hub:{REPO}@v1"), b)  # a tag
    assert _same(simmim.get_model(PRE, pretrained=f"hf-hub:{REPO}@{commit}"), b)  # a commit
    assert _same(simmim.get_model(PRE, pretrained=f"hf-hub:{REPO}@v1:official/b.pth"), b)  # a file in it
    path = sources.resolve(f"hf-hub:{REPO}@v1:official/b.pth")
    assert path.parts[-4:] == ("snapshots", commit, "official", "b.pth")  # huggingface_hub's own cache


def test_hf_hub_wherever_weights_are_taken(hub_cache, tmp_path, capsys):
    a, _, _ = hub_cache
    load_photo("chelsea").resize((64, 64)).save(tmp_path / "cat.png")
    source = f"hf-hub:{REPO}"
    result = simmim.inference_model(PRE, str(tmp_path / "cat.png"), weights=source, seed=0)
    expected = simmim.inference_model(a, str(tmp_path / "cat.png"), seed=0)
    assert result["loss"] == expected["loss"]
    assert main(["reconstruct", PRE, str(tmp_path / "cat.png"), "--weights", source, "--out",
                 str(tmp_path / "rec.png")]) == 0
    assert main(["pretrain", "--preset", "nano-pretrain", "--data", str(tmp_path / "no-data"), "--out",
                 str(tmp_path / "run"), "--pretrained", source]) == 2  # the weights load, then the data is missing
    captured = capsys.readouterr()
    assert f"pretrained: encoder, decoder and mask token from {source} (" in captured.out
    assert "no image folder or list file at" in captured.err


@pytest.mark.parametrize(("source", "message"), [
    (f"hf-hub:{REPO}:missing.pth", rf"hf-hub:{REPO}:missing\.pth: missing\.pth not in the Hub cache .*hf-cache "
                                   "and HF_HUB_OFFLINE is set; download it once on a connected machine"),
    (f"hf-hub:{REPO}@v2", rf"hf-hub:{REPO}@v2: model\.safetensors / pytorch_model\.bin at revision v2 not in the "
                          "Hub cache"),
    ("hf-hub:test-org/elsewhere", "hf-hub:test-org/elsewhere: model.safetensors / pytorch_model.bin not in the Hub"),
    ("hf-hub:no-repo", r"hf-hub:no-repo: expected hf-hub:ORG/NAME, optionally @REVISION and :FILE"),
])
def test_hub_errors_are_one_line(source, message, hub_cache, tmp_path, capsys):
    import re

    assert main(["pretrain", "--preset", "nano-pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--pretrained", source]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_zoo_models_on_the_hub_say_so_and_load_from_it(hub_cache, monkeypatch, capsys):
    assert main(["models", "simmim_pretrain__swin_base__img192_window6__100ep"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("hf-hub:microsoft/swin-base-simmim-window6-192")
    a, _, _ = hub_cache
    spec = simmim.zoo.get_spec(PRE)
    import dataclasses

    monkeypatch.setattr(sources, "get_spec", lambda name: dataclasses.replace(spec, hub=REPO))
    assert _same(simmim.get_model(PRE, pretrained=True), a)


# -- downloads -------------------------------------------------------------------------------------------

class _Server(http.server.BaseHTTPRequestHandler):
    """Serves `files` (name -> bytes); a name in `cut` sends its Content-Length but only half the bytes,
    then closes (once: the next request gets the whole file)."""

    files: dict[str, bytes] = {}
    cut: set[str] = set()

    def do_HEAD(self):
        self._headers()

    def do_GET(self):
        data = self._headers()
        if data is None:
            return
        name = self.path.lstrip("/")
        if name in self.cut:
            self.cut.discard(name)
            data = data[: len(data) // 2]
            self.close_connection = True
        self.wfile.write(data)

    def _headers(self) -> bytes | None:
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return None
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    _Server.files, _Server.cut = {}, set()


def _weights(tmp_path: Path, randomize) -> bytes:
    torch.save({"model": randomize(simmim.get_model(PRE)).state_dict()}, tmp_path / "w.pth")
    return (tmp_path / "w.pth").read_bytes()


@pytest.mark.parametrize("hashed", [True, False])
def test_an_interrupted_download_leaves_nothing_and_the_next_one_succeeds(hashed, server, tmp_path, randomize,
                                                                         capsys):
    data = _weights(tmp_path, randomize)
    name = f"w_20220829-{hashlib.sha256(data).hexdigest()[:8]}.pth" if hashed else "w_500k.pth"
    _Server.files, _Server.cut = {name: data}, {name}
    cache = tmp_path / "cache"
    # torch.hub's hash check notices a short file with a hash in its name, the size check one without
    message = "a transfer cut short" if hashed else r"the transfer stopped after [\d,]+ of [\d,]+ bytes"
    with pytest.raises((OSError, ValueError), match=message) as failed:
        sources.download(f"{server}/{name}", cache)
    assert len(str(failed.value).splitlines()) == 1
    assert list(cache.iterdir()) == []  # no file under the final name, and no partial one beside it
    path = sources.download(f"{server}/{name}", cache)
    assert path == cache / name and path.read_bytes() == data and list(cache.iterdir()) == [path]


def test_a_download_with_another_hash_leaves_nothing(server, tmp_path, randomize):
    data = _weights(tmp_path, randomize)
    wrong, right = "w_20220829-00000000.pth", f"w_20220829-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    _Server.files = {wrong: data, right: data}
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"sha256 does not start with '00000000' from its name .*nothing was kept"
                       ) as failed:
        sources.download(f"{server}/{wrong}", cache)
    assert len(str(failed.value).splitlines()) == 1 and list(cache.iterdir()) == []
    (cache / right).write_bytes(b"damaged")  # a cached file that fails its hash is downloaded again
    assert sources.download(f"{server}/{right}", cache).read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == [right]


def test_an_exported_folder_on_the_hub_is_a_model_for_every_command(hub_cache, hub_repo, tmp_path, randomize,
                                                                    image_folder, capsys):
    from simmim.engine.probe import load_encoder
    from simmim.serve.server import load_served_model

    classifier = randomize(simmim.get_model(CLS, num_classes=2)).eval()
    folder = hub.export(classifier, tmp_path / "exported", name=CLS, classes=["class_0", "class_1"])
    hub_repo(tmp_path / "hf-cache", "test-org/exported", "c" * 40,
             {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")})
    source = "hf-hub:test-org/exported"
    assert _same(simmim.get_model(source), classifier) and simmim.get_model(source).classes == ["class_0", "class_1"]
    assert _same(load_encoder(source), classifier.encoder)  # probe
    served, name, _ = load_served_model(source)  # serve
    assert _same(served, classifier) and name == source
    data = image_folder(tmp_path / "data", train_per_class=2, val_per_class=2, size=64)
    capsys.readouterr()
    assert main(["evaluate", source, "--data", str(data), "--batch-size", "4"]) == 0
    assert main(["evaluate", str(folder), "--data", str(data), "--batch-size", "4"]) == 0
    # the result lines (each run's header says first how it splits the cores, measured, so apart)
    from_hub, local = [line for line in capsys.readouterr().out.splitlines() if line.startswith("top-1")]
    assert from_hub == local and "(4 images)" in local
    # an HF transformers repository holds no simmim architecture: named with --model, read as weights
    assert main(["evaluate", f"hf-hub:{REPO}", "--data", str(data)]) == 2
    assert "name its architecture" in capsys.readouterr().err


class _Hub(http.server.BaseHTTPRequestHandler):
    """A Hub endpoint that has nothing: the answers of huggingface.co's resolve URLs for a missing
    repository, revision or file (404 with its X-Error-Code header)."""

    def do_HEAD(self):
        _, org, name, _, revision, *_ = self.path.split("/")
        code = ("RepoNotFound" if name == "missing" else "RevisionNotFound" if revision == "v9" else
                "GatedRepo" if name == "gated" else "EntryNotFound")
        self.send_response(403 if code == "GatedRepo" else 404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("source", "message"), [
    ("hf-hub:test-org/missing", "hf-hub:test-org/missing: no repository test-org/missing on the Hub"),
    ("hf-hub:test-org/model@v9", "hf-hub:test-org/model@v9: test-org/model has no revision v9"),
    ("hf-hub:test-org/model", "hf-hub:test-org/model: test-org/model has no model.safetensors or pytorch_model.bin; "
                              "name one as hf-hub:test-org/model:FILE"),
    ("hf-hub:test-org/model:w.pth", "hf-hub:test-org/model:w.pth: test-org/model has no w.pth$"),
    ("hf-hub:test-org/gated", "hf-hub:test-org/gated: test-org/gated is gated on the Hub"),
])
def test_the_hubs_own_errors_become_one_line(source, message, tmp_path, monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub read the variable when it was imported (maybe by an offline test before this one)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        with pytest.raises(OSError, match=message) as failed:
            sources.resolve(source)
        assert len(str(failed.value).splitlines()) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()
