"""Weights sources (`simmim.zoo.sources`): `hf-hub:` read offline from a Hub cache built in
huggingface_hub's own layout (revisions, files, its errors as one line), and downloads that leave
nothing under the final name when a transfer is cut short or the hash is wrong (a local HTTP server)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch

import simmim
from simmim.checkpoint.formats import HF
from simmim.checkpoint.io import atomic_save_safetensors
from simmim.cli import main
from simmim.data.photos import load_photo
from simmim.zoo import sources

PRE = "simmim_swin-nano_test-64px"
REPO = "test-org/swin-nano-simmim"


def _hub_repo(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    """One commit of a Hub repository in huggingface_hub's cache layout: blobs/<sha256>, refs/<ref>
    holding the commit hash, snapshots/<commit>/<file> linking to its blob."""
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


def _hf_files(model: torch.nn.Module, tmp_path: Path) -> dict[str, bytes]:
    """An HF transformers repository's files for `model`: config.json and model.safetensors (HF layout)."""
    path = tmp_path / f"hf-{id(model)}.safetensors"
    atomic_save_safetensors(HF.from_ours(model.state_dict()), path, metadata={"format": "pt"})
    return {"config.json": json.dumps({"model_type": "swin"}).encode(), "model.safetensors": path.read_bytes()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, randomize):
    """An offline Hub cache with REPO at two commits: main (model A), tag v1 (model B, also as an
    official-layout .pth file); returns (A, B, the commit of v1)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = randomize(simmim.get_model(PRE)), randomize(simmim.get_model(PRE))
    _hub_repo(cache, REPO, "a" * 40, _hf_files(a, tmp_path))
    torch.save({"model": b.state_dict()}, tmp_path / "b.pth")
    _hub_repo(cache, REPO, "b" * 40, {**_hf_files(b, tmp_path), "official/b.pth": (tmp_path / "b.pth").read_bytes()},
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
