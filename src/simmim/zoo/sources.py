"""Weights sources: what a `pretrained=`, `--weights` or `--pretrained` names, resolved to a local
checkpoint that `checkpoint.transfer.read_checkpoint` reads.

A source is one of
- a checkpoint file of any supported layout (official, mmpretrain, HF, ours; a training checkpoint);
- a folder: a training run's (its newest checkpoint), a sharded training checkpoint, an exported
  folder (`simmim export`) or an HF folder (`config.json` + `model.safetensors` or `pytorch_model.bin`);
- a zoo name: its published weights, downloaded into the cache on first use;
- `hf-hub:ORG/NAME[@REVISION][:FILE]`, a file of a Hugging Face Hub repository (timm's spelling,
  with a revision, a branch, tag or commit, after `@`, and a file inside the repository after `:`;
  without a file, the repository's `model.safetensors` or else `pytorch_model.bin`, so that an HF
  transformers repository loads as an HF folder does). It goes through `huggingface_hub` itself:
  its cache (`HF_HUB_CACHE`, `HF_HOME`), `HF_HUB_OFFLINE=1`, `HF_ENDPOINT`, its token; its errors
  become one line.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from torch.hub import download_url_to_file

from ..checkpoint.io import hash_in_name, sha256_prefix_matches
from ..checkpoint.sharded import is_sharded_checkpoint
from ..errors import UsageError
from ..fsutil import fsync_directory
from ..hardware import cache_dir
from .registry import get_spec
from .runs import newest_checkpoint

PYTHON_HINT = "pass pretrained=PATH to a local file"
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""The weights file of an exported or HF folder (or Hub repository), in the order looked for."""
HUB_PREFIX = "hf-hub:"
_HUB = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(@(?P<revision>[^:]+))?(:(?P<filename>.+))?")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of its boolean variables


class WeightsUnavailable(ConnectionError):
    """Published weights that cannot be had (none released, or the download failed); `reason` says
    why without the remedy, which differs between Python (`pretrained=PATH`) and the CLI."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; {PYTHON_HINT}")
        self.reason = reason


def download(url: str, cache: Path | None = None) -> Path:
    """The cached copy of `url`, downloaded on first use and checked against the hash in its name. A
    download cut short or with another hash leaves nothing under the file's name (torch.hub's
    `download_url_to_file` writes a temporary file and checks the hash; the size is checked here),
    so the next call downloads afresh; a cached file that fails its hash is downloaded again."""
    cache = cache or cache_dir()
    target = cache / Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1]))
    if target.exists():
        if sha256_prefix_matches(target, target.name) is not False:
            return target
        print(f"{target} does not match the hash in its name: downloading it again", file=sys.stderr)
        target.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {target}", file=sys.stderr)
    prefix = hash_in_name(target.name)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.download")
    try:
        # without a hash to check, the size the server announces is what tells a transfer cut short
        # (urllib returns the bytes it got as if they were all)
        size = None if prefix else _announced_size(url)
        download_url_to_file(url, str(tmp), hash_prefix=prefix, progress=True)
        if size is not None and tmp.stat().st_size != size:
            raise WeightsUnavailable(f"could not download {url} (the transfer stopped after {tmp.stat().st_size:,} "
                                     f"of {size:,} bytes); try again")
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, target)
        fsync_directory(cache)
    except RuntimeError as err:  # torch.hub's "invalid hash value"
        raise UsageError(f"{url}: sha256 does not start with {prefix!r} from its name (a transfer cut short, or not "
                         f"the published file); nothing was kept, try again ({err})") from None
    except WeightsUnavailable:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", None) or err or type(err).__name__
        raise WeightsUnavailable(f"could not download {url} ({reason}); fetch it on a connected machine "
                                 f"(or put it in {cache})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


def _announced_size(url: str) -> int | None:
    """The Content-Length a server gives for `url` (a HEAD request); None where it gives none or
    answers no HEAD."""
    if not url.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "torch.hub"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            length = response.headers.get("Content-Length")
    except (urllib.error.URLError, http.client.HTTPException, OSError):  # no HEAD here: the GET will tell
        return None
    return int(length) if length and length.isdigit() else None


def published_weights(name: str) -> Path:
    """The cached file of a zoo model's published weights (downloaded on first use): from its URL, or
    from its Hub repository."""
    spec = get_spec(name)
    if spec.weights:
        return download(spec.weights)
    if spec.hub:
        return hub_download(HubFile(spec.hub))
    raise WeightsUnavailable(f"{spec.name} has no downloadable weights ({spec.notes or 'none were released'})")


def folder_weights(path: Path) -> Path:
    """The checkpoint of a folder: itself for a sharded training checkpoint, else its weights file."""
    if is_sharded_checkpoint(path):
        return path
    found = next((path / name for name in FOLDER_WEIGHTS if (path / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{path}: a folder without weights; expected a training run (ckpt-<step>.pt), a "
                                f"sharded training checkpoint (.metadata) or {' / '.join(FOLDER_WEIGHTS)} (an "
                                "exported or HF folder)")
    return found


@dataclass(frozen=True)
class HubFile:
    """`hf-hub:ORG/NAME[@REVISION][:FILE]` taken apart."""

    repo: str
    revision: str | None = None
    """Branch, tag or commit; None for the repository's default branch (main)."""
    filename: str | None = None
    """A file inside the repository; None for its model.safetensors or pytorch_model.bin."""

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo + (f"@{self.revision}" if self.revision else "") + \
            (f":{self.filename}" if self.filename else "")


def parse_hub(source: str) -> HubFile | None:
    """The Hub file `source` names, None if it is not an `hf-hub:` source; a malformed one is refused."""
    if not source.startswith(HUB_PREFIX):
        return None
    match = _HUB.fullmatch(source.removeprefix(HUB_PREFIX))
    if match is None:
        raise UsageError(f"{source}: expected {HUB_PREFIX}ORG/NAME, optionally @REVISION and :FILE "
                         f"(e.g. {HUB_PREFIX}microsoft/swin-base-simmim-window6-192@main:model.safetensors)")
    return HubFile(match["repo"], match["revision"], match["filename"])


def hub_download(hub: HubFile) -> Path:
    """The local path of a Hub file, from huggingface_hub's cache or downloaded into it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub reads HF_HUB_OFFLINE when it is imported; set later (a test, a notebook), it
    # still keeps its requests off the network here
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    cache, endpoint = os.environ.get("HF_HUB_CACHE") or None, os.environ.get("HF_ENDPOINT") or None
    at = f" at revision {hub.revision}" if hub.revision else ""
    names = [hub.filename] if hub.filename else list(FOLDER_WEIGHTS)
    for name in names:
        try:
            return Path(hf_hub_download(hub.repo, name, revision=hub.revision, cache_dir=cache, endpoint=endpoint,
                                        local_files_only=offline))
        except GatedRepoError:
            raise WeightsUnavailable(f"{hub}: {hub.repo} is gated on the Hub: accept its terms on its page and log "
                                     "in (`hf auth login`)") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"{hub}: no repository {hub.repo} on the Hub (or a private one: log in with "
                                    "`hf auth login`)") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"{hub}: {hub.repo} has no revision {hub.revision}") from None
        except LocalEntryNotFoundError:  # before EntryNotFoundError, its base
            if name != names[-1]:
                continue
            where = constants.HF_HUB_CACHE if cache is None else cache
            why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
            raise WeightsUnavailable(f"{hub}: {' / '.join(names)}{at} not in the Hub cache {where} and {why}; "
                                     "download it once on a connected machine") from None
        except EntryNotFoundError:  # the repository has no such file
            continue
        except OSError as err:  # other HTTP and connection errors
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise WeightsUnavailable(f"{hub}: could not download {name}{at} ({first})") from None
    hint = "" if hub.filename else f"; name one as {HUB_PREFIX}{hub.repo}:FILE"
    raise FileNotFoundError(f"{hub}: {hub.repo}{at} has no {' or '.join(names)}{hint}")


def resolve(source: str | Path) -> Path:
    """The local checkpoint file (or sharded checkpoint folder) that a weights source names."""
    hub = parse_hub(str(source))
    if hub is not None:
        return hub_download(hub)
    path = newest_checkpoint(source)  # a training run's folder: its newest checkpoint
    if path.is_dir():
        return folder_weights(path)
    if path.exists():
        return path
    try:
        spec = get_spec(str(source))
    except KeyError:
        raise FileNotFoundError(f"weights not found: {source} (expected a checkpoint file or folder, a zoo "
                                f"name with published weights or {HUB_PREFIX}ORG/NAME)") from None
    return published_weights(spec.name)
