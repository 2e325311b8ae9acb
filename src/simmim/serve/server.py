"""The HTTP side of `simmim serve`: the page, `/v1/reconstruct`, `/v1/predict`, `/v1/model`, `/health`.

Inputs are decoded and checked in the request's thread; the forward pass runs through a `Batcher`,
so requests arriving together share one forward. Every bad input is a 4xx with a one-line JSON error;
a bug is a 500 with the same, and its traceback on stderr."""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import time
import traceback
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.masking import MaskGenerator
from ..errors import UsageError
from ..inference import check_mask, class_names, classify, load_model, mask_shape, preprocess, reconstruct
from ..models import SimMIM
from ..zoo.hub import model_config
from ..zoo.runs import architecture_of, newest_checkpoint
from .batching import Batcher

PANELS = ("original", "masked", "reconstruction", "pasted")


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server to this machine."""
    port: int = 8000
    """0 picks a free port."""
    max_upload_mb: float = 20.0
    """Largest request body accepted (413 above)."""
    max_pixels: int = 25_000_000
    """Largest image accepted, width x height, checked before decoding (413 above)."""
    batch_window_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_batch: int = 16
    """Most images in one forward."""
    verbose: bool = False
    """Log every request to stderr."""


class BadRequest(Exception):
    """A client error: its HTTP status and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def load_served_model(source: str, weights: str | None = None,
                      random_weights: bool = False) -> tuple[nn.Module, str, str]:
    """(model, name, where its weights came from) for a zoo name, an exported directory, a simmim
    training checkpoint, or a training run's folder (its newest checkpoint)."""
    model = load_model(source, weights, random_weights=random_weights)
    if not Path(source).exists():
        return model, source, "random (untrained)" if random_weights else str(weights or "published")
    # a run folder, training checkpoint or exported directory names its model
    found = architecture_of(source)
    path = newest_checkpoint(source)
    return model, found.name if found and found.name else path.name, str(path)


def model_info(model: nn.Module, name: str, weights: str, settings: ServeSettings) -> dict:
    """What `/v1/model` answers and the page shows."""
    config = model_config(model, name)
    info = {"name": name, "task": config["task"], "weights": weights, "img_size": model.encoder.cfg.img_size,
            "params": sum(p.numel() for p in model.parameters()), "config": config,
            "max_batch": settings.max_batch, "batch_window_ms": settings.batch_window_ms}
    if isinstance(model, SimMIM):
        info.update(mask_shape=list(mask_shape(model)), patch_size=model.patch_size,
                    mask_patch_size=model.mask_generator.mask_patch_size, mask_ratio=model.mask_generator.mask_ratio)
    else:
        info.update(num_classes=model.num_classes)
    return info


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image of encoded bytes; the pixel count is checked from the header, before decoding."""
    if not data:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "empty image: expected the bytes of a PNG, JPEG or other image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image of {w}x{h} = {w * h:,} pixels: "
                                 f"over the limit of {max_pixels:,} (--max-pixels)")
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image refused as a decompression bomb ({err})") \
            from None
    except Image.UnidentifiedImageError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"not an image: {len(data):,} bytes in no format Pillow reads "
                         "(expected PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"cannot read the image ({err})") from None


def _image_field(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    try:  # base64, optionally as a data URL
        return base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "image: expected base64 (or a data: URL)") from None


def parse_body(content_type: str, body: bytes) -> dict:
    """The request's fields: JSON object, multipart form, or the raw bytes of an image."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/json":
        try:
            fields = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not JSON ({err})") from None
        if not isinstance(fields, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "JSON body: expected an object with an 'image' key")
        return fields
    if kind == "multipart/form-data":
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        if not message.is_multipart():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "multipart body without parts (is the boundary right?)")
        fields = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                payload = part.get_payload(decode=True) or b""
                fields[name] = payload if name == "image" else payload.decode("utf-8", "replace")
        return fields
    return {"image": body}


def _number(fields: dict, key: str, kind: type, default):
    value = fields.get(key)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"{key}={value!r}: expected a {kind.__name__}") from None


def request_mask(model: SimMIM, fields: dict) -> torch.Tensor:
    """The given mask (a 0/1 grid, as JSON) or a random one from mask_ratio, mask_patch_size, seed."""
    mask = fields.get("mask")
    try:
        if mask is not None and mask != "":
            return check_mask(model, json.loads(mask) if isinstance(mask, str) else mask, 1)
        gen = model.mask_generator
        generator = MaskGenerator(gen.input_size, _number(fields, "mask_patch_size", int, gen.mask_patch_size),
                                  gen.model_patch_size, _number(fields, "mask_ratio", float, gen.mask_ratio))
        return generator(np.random.default_rng(_number(fields, "seed", int, 0))).unsqueeze(0)
    except (UsageError, json.JSONDecodeError) as err:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"mask: {err}") from None


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class App:
    """The loaded model, its batcher and the request logic, independent of HTTP."""

    def __init__(self, model: nn.Module, name: str, weights: str, settings: ServeSettings):
        self.model, self.name, self.settings = model.eval(), name, settings
        self.info = model_info(model, name, weights, settings)
        self.is_simmim = isinstance(model, SimMIM)
        if not self.is_simmim:
            class_names(model)  # loads ImageNet's names now rather than in the first request
        self.batcher = Batcher(self._forward, settings.batch_window_ms / 1000, settings.max_batch)

    def _forward(self, items: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[dict]:
        batch = torch.cat([x for x, _ in items])
        if self.is_simmim:
            return reconstruct(self.model, batch, torch.cat([m for _, m in items]))
        return classify(self.model, batch)

    def handle(self, endpoint: str, fields: dict) -> dict:
        if endpoint == "reconstruct" and not self.is_simmim:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"{self.name} is a classifier: POST /v1/predict")
        if endpoint == "predict" and self.is_simmim:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"{self.name} is a pretraining model: POST /v1/reconstruct")
        if "image" not in fields:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "no 'image' field in the request")
        image = decode_image(_image_field(fields["image"]), self.settings.max_pixels)
        _, x = preprocess(self.model, [image])
        if self.is_simmim:
            out = self.batcher.submit((x, request_mask(self.model, fields)))
            return {"model": self.name, "loss": out["loss"], "mask": out["mask"].tolist(),
                    "masked_fraction": float(out["mask"].mean()), "images": {k: _png(out[k]) for k in PANELS}}
        topk = min(max(_number(fields, "topk", int, 5), 1), self.model.num_classes)
        out = self.batcher.submit((x, None))
        names, scores = class_names(self.model), out["pred_scores"]
        top = [{"label": int(i), "class": names[i], "score": float(scores[i])} for i in scores.argsort()[::-1][:topk]]
        return {"model": self.name, "pred_label": out["pred_label"], "pred_class": out["pred_class"],
                "pred_score": out["pred_score"], "top": top}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and Expect: 100-continue answered before the body is sent
    timeout = 30  # a client that stops sending mid-request frees its thread
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.app.settings.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": " ".join(str(message).split())})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (unsupported method, malformed request) as one-line JSON too."""
        self.close_connection = True
        self._error(code, message or HTTPStatus(code).phrase)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            page = resources.files(__package__).joinpath("page/index.html").read_bytes()
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
        elif path == "/health":
            self._json(HTTPStatus.OK, {"status": "ok", "model": self.server.app.name})
        elif path == "/v1/model":
            self._json(HTTPStatus.OK, self.server.app.info)
        elif path in ("/v1/reconstruct", "/v1/predict"):
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page or endpoint: {path}")

    def handle_expect_100(self) -> bool:
        if self._upload_too_large():  # refuse before the client sends the body
            self.close_connection = True
            return False
        return super().handle_expect_100()

    def _length(self) -> int | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _upload_too_large(self) -> bool:
        length, limit = self._length(), int(self.server.app.settings.max_upload_mb * 2**20)
        if length is not None and length > limit:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"upload of {length:,} bytes: over the limit of {limit:,} (--max-upload-mb)")
            return True
        return False

    def _drain(self, length: int, budget_s: float = 5.0) -> None:
        """Reads and drops an unwanted body for a moment, so that closing the socket does not reset
        the connection before the client has read the error."""
        end = time.monotonic() + budget_s
        try:
            while length > 0 and time.monotonic() < end and (chunk := self.rfile.read1(min(length, 1 << 20))):
                length -= len(chunk)
        except OSError:
            pass

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        endpoint = {"/v1/reconstruct": "reconstruct", "/v1/predict": "predict"}.get(path)
        length = self._length()
        if endpoint is None or length is None:
            self.close_connection = True  # the body is not read
            if endpoint is None:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
            else:
                self._error(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length (chunked bodies are not read)")
            return
        if self._upload_too_large():
            self.close_connection = True
            self.wfile.flush()
            self._drain(length)
            return
        if length == 0:
            self._error(HTTPStatus.BAD_REQUEST, "empty body: expected an image (raw, multipart or base64 JSON)")
            return
        body = self.rfile.read(length)
        fields = dict(parse_qsl(urlsplit(self.path).query))
        try:
            fields.update(parse_body(self.headers.get("Content-Type", ""), body))
            self._json(HTTPStatus.OK, self.server.app.handle(endpoint, fields))
        except BadRequest as err:
            self._error(err.status, str(err))
        except Exception as err:  # a bug must not take the server down; the client gets a 500, the log the traceback
            print(f"simmim serve: 500 on POST {path} (a bug in simmim, please report it):\n{traceback.format_exc()}",
                  file=sys.stderr, end="", flush=True)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: App

    def server_close(self) -> None:
        super().server_close()
        self.app.batcher.close()


def make_server(model: nn.Module, name: str, weights: str, settings: ServeSettings) -> _Server:
    """A bound server (not yet serving): call `serve_forever()`, or run it in a thread."""
    if settings.max_upload_mb <= 0 or settings.max_pixels <= 0:
        raise UsageError(f"--max-upload-mb {settings.max_upload_mb}, --max-pixels {settings.max_pixels}: expected > 0")
    server = _Server((settings.host, settings.port), Handler)
    server.app = App(model, name, weights, settings)
    return server


def serve(source: str, weights: str | None, random_weights: bool, settings: ServeSettings) -> None:
    """Loads the model once and serves until interrupted."""
    model, name, where = load_served_model(source, weights, random_weights)
    server = make_server(model, name, where, settings)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} (weights: {where}) on http://{shown}:{port}/  (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

