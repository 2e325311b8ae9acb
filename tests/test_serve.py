"""`simmim serve`: the JSON API against `inference_model`, bad input, concurrency and batching, and
the page in a real headless Chromium. Servers run in-process on an ephemeral 127.0.0.1 port."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from simmim.inference import inference_model
from simmim.serve import Batcher, ServeSettings, load_served_model, make_server
from simmim.zoo.hub import export, get_model

PRETRAIN, CLASSIFIER = "simmim_swin-nano_test-64px", "swin-nano_test-64px"
PANELS = ("original", "masked", "reconstruction", "pasted")


@contextlib.contextmanager
def running(model, name, **settings):
    server = make_server(model, name, "random (untrained)", ServeSettings(port=0, **settings))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def pretrain_server():
    with running(get_model(PRETRAIN), PRETRAIN, max_upload_mb=1, max_pixels=1_000_000, batch_window_ms=20) as server:
        yield server


def request(server, method, path, body=b"", content_type="application/octet-stream", headers=None):
    """(status, parsed JSON) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def post_json(server, path, fields):
    return request(server, "POST", path, json.dumps(fields).encode(), "application/json")


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def photo(seed=0, shape=(90, 120)) -> np.ndarray:
    """A smooth colour image (gradients and a disc), so panels and reconstructions are not noise."""
    y, x = np.mgrid[: shape[0], : shape[1]] / max(shape)
    disc = ((y - 0.35) ** 2 + (x - 0.5 - 0.05 * seed) ** 2 < 0.04).astype(float)
    rgb = np.stack([x, y, 0.5 * disc + 0.3 * (1 - x)], -1)
    return (rgb * 255).clip(0, 255).astype(np.uint8)


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = "simmimtestboundary"
    parts = []
    for name, value in fields.items():
        extra = '; filename="x.png"\r\nContent-Type: image/png' if isinstance(value, bytes) else ""
        data = value if isinstance(value, bytes) else str(value).encode()
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + data)
    return b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def assert_same_reconstruction(out, expected):
    assert out["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert np.array_equal(np.array(out["mask"]), expected["mask"])
    for k in PANELS:
        assert np.abs(decode(out["images"][k]).astype(int) - np.asarray(expected[k]).astype(int)).max() <= 1, k


def test_reconstruct_round_trip_equals_inference_model(pretrain_server):
    model, image = pretrain_server.app.model, photo()
    mask = np.zeros((16, 16), dtype=np.int64)
    mask[2:9, 4:14] = 1  # a hand-made mask, not aligned to the 32-px blocks
    expected = inference_model(model, image, mask=mask)
    status, out = post_json(pretrain_server, "/v1/reconstruct",
                            {"image": base64.b64encode(png_bytes(image)).decode(), "mask": mask.tolist()})
    assert status == 200, out
    assert_same_reconstruction(out, expected)
    assert out["masked_fraction"] == pytest.approx(mask.mean())
    # without a mask: the random mask of the given seed, as inference_model draws it (multipart and raw bytes)
    body, kind = multipart({"image": png_bytes(image), "seed": 3})
    status, out = request(pretrain_server, "POST", "/v1/reconstruct", body, kind)
    assert status == 200, out
    assert_same_reconstruction(out, inference_model(model, image, seed=3))
    status, raw = request(pretrain_server, "POST", "/v1/reconstruct?seed=3", png_bytes(image), "image/png")
    assert status == 200 and raw["loss"] == out["loss"] and raw["mask"] == out["mask"]


def test_mask_settings_per_request(pretrain_server):
    image = base64.b64encode(png_bytes(photo())).decode()
    status, out = post_json(pretrain_server, "/v1/reconstruct", {"image": image, "mask_ratio": 0.25,
                                                                "mask_patch_size": 16})
    assert status == 200, out
    mask = np.array(out["mask"])
    assert mask.mean() == pytest.approx(4 / 16)  # 4 of the 16 blocks of 16 px
    blocks = mask.reshape(4, 4, 4, 4).transpose(0, 2, 1, 3).reshape(16, 16)
    assert set(blocks.min(1) == blocks.max(1)) == {True}  # each 16-px block is all masked or all visible


def test_model_info_health_and_page(pretrain_server):
    status, info = request(pretrain_server, "GET", "/v1/model")
    assert status == 200
    assert info["name"] == PRETRAIN and info["task"] == "pretrain" and info["mask_shape"] == [16, 16]
    assert info["mask_patch_size"] == 32 and info["mask_ratio"] == 0.6 and info["img_size"] == 64
    assert request(pretrain_server, "GET", "/health") == (200, {"status": "ok", "model": PRETRAIN})
    conn = http.client.HTTPConnection(*pretrain_server.server_address[:2], timeout=30)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read().decode()
    conn.close()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert 'id="panel-pasted"' in page and "http" not in page.replace("http-equiv", "")  # nothing fetched from outside


def test_predict_round_trip_equals_inference_model():
    model = get_model(CLASSIFIER)
    with running(model, CLASSIFIER) as server:
        image = photo(1)
        body, kind = multipart({"image": png_bytes(image), "topk": 5})
        status, out = request(server, "POST", "/v1/predict", body, kind)
        assert status == 200, out
        expected = inference_model(model, image)
        top = expected["pred_scores"].argsort()[::-1][:5]
        assert [t["label"] for t in out["top"]] == top.tolist()
        assert [t["score"] for t in out["top"]] == pytest.approx(expected["pred_scores"][top].tolist(), rel=1e-5)
        assert out["pred_label"] == expected["pred_label"] and out["pred_class"] == expected["pred_class"]
        status, err = post_json(server, "/v1/reconstruct", {"image": base64.b64encode(png_bytes(image)).decode()})
        assert status == 400 and "classifier: POST /v1/predict" in err["error"]


def test_inference_model_takes_a_mask_and_gives_each_image_its_own_loss():
    model, images = get_model(PRETRAIN), [photo(0), photo(1)]
    masks = np.zeros((2, 16, 16), dtype=np.int64)
    masks[0, :8], masks[1, :, 3:5] = 1, 1
    batch = inference_model(model, images, mask=masks)
    for image, mask, result in zip(images, masks, batch, strict=True):
        alone = inference_model(model, image, mask=mask)
        assert np.array_equal(result["mask"], mask) and result["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert batch[0]["loss"] != pytest.approx(batch[1]["loss"], rel=1e-3)
    with pytest.raises(ValueError, match=r"mask of shape \(8, 8\): expected 16x16"):
        inference_model(model, images[0], mask=np.ones((8, 8), dtype=np.int64))


def test_served_model_from_an_exported_directory(tmp_path):
    model = get_model(PRETRAIN)
    export(model, tmp_path / "export", name=PRETRAIN)
    loaded, name, weights = load_served_model(str(tmp_path / "export"))
    assert name == PRETRAIN and weights == str(tmp_path / "export")
    image = photo()
    assert inference_model(loaded, image)["loss"] == inference_model(model, image)["loss"]
    with pytest.raises(ValueError, match="exclude each other"):
        load_served_model(PRETRAIN, "w.pth", random_weights=True)


def test_served_model_from_a_training_run_folder(tmp_path, image_folder, settings):
    from simmim.config import load_config
    from simmim.engine.evaluation import load_run_model
    from simmim.engine.pretraining import pretrain

    run = pretrain(load_config("nano-pretrain", overrides=settings(
        "pretrain", image_folder(tmp_path / "images") / "train", tmp_path / "run", "schedule.epochs=2",
        "checkpoint.every_steps=1", "checkpoint.keep=2")))
    loaded, name, weights = load_served_model(str(tmp_path / "run"))
    assert name == PRETRAIN and weights == str(run.checkpoint)  # the newest of the run's two checkpoints
    image = photo()
    newest = inference_model(load_run_model(run.checkpoint)[0], image)["loss"]
    assert inference_model(loaded, image)["loss"] == newest


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb as far as its size goes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD = base64.b64encode(png_bytes(photo())).decode()
BAD_INPUTS = {
    "not an image": (b"hello, this is text", "image/png", 400, "not an image"),
    "empty body": (b"", "image/png", 400, "empty body"),
    "decompression bomb": (png_header_only(40_000, 40_000), "image/png", 413, "decompression bomb"),
    "over --max-pixels": (png_header_only(2000, 1000), "image/png", 413,
                          "image of 2000x1000 = 2,000,000 pixels: over the limit of 1,000,000"),
    "truncated image": (png_bytes(photo())[:200], "image/png", 400, "cannot read the image"),
    "odd mask size": (json.dumps({"image": GOOD, "mask": np.ones((15, 16), int).tolist()}).encode(),
                      "application/json", 400, "mask of shape (15, 16): expected 16x16"),
    "mask not 0/1": (json.dumps({"image": GOOD, "mask": np.full((16, 16), 2).tolist()}).encode(),
                     "application/json", 400, "expected only 0 and 1"),
    "ragged mask": (json.dumps({"image": GOOD, "mask": [[0, 1], [1]]}).encode(), "application/json", 400, "mask:"),
    "mask patch size": (json.dumps({"image": GOOD, "mask_patch_size": 12}).encode(), "application/json", 400,
                        "mask_patch_size=12 must divide input_size=64"),
    "mask ratio": (json.dumps({"image": GOOD, "mask_ratio": "lots"}).encode(), "application/json", 400,
                   "mask_ratio='lots': expected a float"),
    "bad base64": (b'{"image": "not base64!"}', "application/json", 400, "expected base64"),
    "not JSON": (b"{oops", "application/json", 400, "body is not JSON"),
    "JSON without image": (b'{"mask": null}', "application/json", 400, "no 'image' field"),
    "multipart without boundary": (b"abc", "multipart/form-data", 400, "multipart body without parts"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_4xx_and_the_server_lives_on(pretrain_server, case):
    body, kind, expected_status, message = BAD_INPUTS[case]
    status, out = request(pretrain_server, "POST", "/v1/reconstruct", body, kind)
    assert status == expected_status, out
    assert list(out) == ["error"] and "\n" not in out["error"] and message in out["error"], out
    status, out = post_json(pretrain_server, "/v1/reconstruct", {"image": GOOD})
    assert status == 200 and out["loss"] > 0


def test_a_bug_is_a_500_logged_with_its_traceback(pretrain_server, monkeypatch, capsys):
    def broken(items):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(pretrain_server.app.batcher, "run", broken)
    status, out = request(pretrain_server, "POST", "/v1/reconstruct", png_bytes(photo()), "image/png")
    assert (status, out) == (500, {"error": "RuntimeError: injected bug"})
    err = capsys.readouterr().err
    assert "simmim serve: 500 on POST /v1/reconstruct (a bug in simmim, please report it):" in err
    assert "Traceback (most recent call last)" in err and 'raise RuntimeError("injected bug")' in err, err


def test_wrong_endpoint_and_method(pretrain_server):
    assert request(pretrain_server, "GET", "/nope")[0] == 404
    assert request(pretrain_server, "GET", "/v1/reconstruct")[0] == 405
    assert request(pretrain_server, "PUT", "/v1/reconstruct") == (501, {"error": "Unsupported method ('PUT')"})
    status, out = post_json(pretrain_server, "/v1/predict", {"image": GOOD})
    assert status == 400 and "pretraining model: POST /v1/reconstruct" in out["error"]


def test_50_mb_upload_is_refused(pretrain_server):
    host, port = pretrain_server.server_address[:2]
    body = b"\0" * (50 * 2**20)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.putrequest("POST", "/v1/reconstruct")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server may stop reading first
        conn.send(body)
    response = conn.getresponse()
    out = json.loads(response.read())
    conn.close()
    assert response.status == 413 and "upload of 52,428,800 bytes: over the limit of 1,048,576" in out["error"]
    # a client that asks first (Expect: 100-continue, as curl does) is refused before it sends the body
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.putrequest("POST", "/v1/reconstruct")
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    conn.close()
    assert post_json(pretrain_server, "/v1/reconstruct", {"image": GOOD})[0] == 200


@pytest.mark.slow
def test_200_requests_from_8_clients(pretrain_server):
    images = [png_bytes(photo(i)) for i in range(8)]
    sizes_before = len(pretrain_server.app.batcher.batch_sizes)
    host, port = pretrain_server.server_address[:2]

    def client(k: int) -> list[float]:
        conn, latencies = http.client.HTTPConnection(host, port, timeout=60), []  # keep-alive, one per client
        for i in range(25):
            start = time.perf_counter()
            conn.request("POST", f"/v1/reconstruct?seed={i}", body=images[k], headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            out = json.loads(response.read())
            assert response.status == 200 and 0 < out["loss"] < 10
            latencies.append(time.perf_counter() - start)
        conn.close()
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        latencies = np.array([t for ts in pool.map(client, range(8)) for t in ts]) * 1000
    wall = time.perf_counter() - start
    sizes = pretrain_server.app.batcher.batch_sizes[sizes_before:]
    print(f"\n200 requests, 8 clients, {PRETRAIN}: p50 {np.percentile(latencies, 50):.1f} ms, "
          f"p99 {np.percentile(latencies, 99):.1f} ms, {200 / wall:.0f} req/s; {len(sizes)} forwards, "
          f"mean batch {np.mean(sizes):.2f}, largest {max(sizes)}")
    assert len(latencies) == 200 and sum(sizes) == 200
    assert len(sizes) < 200  # requests in flight together shared forwards
    assert wall < 120


def test_batcher_batches_requests_that_arrive_together():
    calls = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [x * 10 for x in items]

    batcher = Batcher(run, window_s=0.3, max_batch=4)
    barrier = threading.Barrier(6)

    def submit(x):
        barrier.wait()
        return batcher.submit(x)

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(submit, range(6))) == [x * 10 for x in range(6)]
    assert sorted(len(c) for c in calls) == [2, 4]  # 6 together: one full batch of 4, then the rest
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit("bad")
    assert batcher.submit(7) == 70  # the worker survives a failing batch
    batcher.close()


# ---- the page in a real browser -------------------------------------------------------------------

def chromium_and_driver() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver, installed when missing and possible; else skip."""
    pytest.importorskip("selenium", reason="selenium (a dev dependency) is not installed")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if None in found and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], capture_output=True,
                       timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("chromium"), shutil.which("chromedriver")
    if None in found:
        pytest.skip("Debian's chromium and chromium-driver are not installed and cannot be installed here "
                    "(needs root and apt-get; `make system-deps` installs them)")
    return found


def panel_is_drawn(screenshot: np.ndarray, rect: dict, ratio: float) -> bool:
    """Whether the screenshot's region of an element holds a picture, not one flat colour."""
    x, y, w, h = (round(rect[k] * ratio) for k in ("x", "y", "width", "height"))
    region = screenshot[y + 2: y + h - 2, x + 2: x + w - 2, :3].astype(float)
    return region.size > 0 and region.std() > 10


@pytest.mark.slow
def test_page_in_headless_chromium(pretrain_server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    chromium, chromedriver = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,800",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    image = tmp_path / "photo.png"
    Image.fromarray(photo(2, (240, 320))).save(image)
    host, port = pretrain_server.server_address[:2]
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://{host}:{port}/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        assert driver.find_element(By.ID, "model-name").text == PRETRAIN
        assert "mask ratio 0.6" in driver.find_element(By.ID, "settings").text
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
            driver.find_element(By.ID, "status").text
        # the brush flips the masked panel's centre patch, and the model reruns with that mask
        centre = driver.execute_script("return mask[8][8]")
        Select(driver.find_element(By.ID, "brush-mode")).select_by_value(str(1 - centre))
        # a 3-patch brush covers patch 8 whether the centre pixel falls in patch 7 or 8
        driver.execute_script("const b = $('brush'); b.value = 3; b.dispatchEvent(new Event('input'))")
        canvas = driver.find_element(By.ID, "panel-masked")
        ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(3, 0).release().perform()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        assert driver.execute_script("return mask[8][8]") == 1 - centre  # the server's answer carries the mask
        assert float(driver.find_element(By.ID, "l1").text) > 0
        path = tmp_path / "serve_page.png"
        driver.save_screenshot(str(path))
        rects = {k: driver.find_element(By.ID, f"panel-{k}").rect for k in PANELS}
        sizes = {k: driver.execute_script(f"return [document.getElementById('panel-{k}').width]")[0] for k in PANELS}
        ratio = driver.execute_script("return window.devicePixelRatio")
    finally:
        driver.quit()
    print(f"\nscreenshot: {path}")
    assert sizes == dict.fromkeys(PANELS, 64)  # each panel holds a 64 px picture from the server
    shot = np.asarray(Image.open(path))
    assert {k: panel_is_drawn(shot, r, ratio) for k, r in rects.items()} == dict.fromkeys(PANELS, True)


@pytest.mark.slow
def test_serve_command_starts_and_refuses_bad_flags(capsys, src_env):
    import re
    import sys

    from simmim.cli import main

    assert main(["serve", PRETRAIN, "--random-weights", "--port", "0", "--max-pixels", "0"]) == 2
    assert "--max-pixels 0: expected > 0" in capsys.readouterr().err
    env = src_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "simmim.cli", "serve", PRETRAIN, "--random-weights", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        match = re.search(r"serving (\S+) \(weights: random \(untrained\)\) on http://127\.0\.0\.1:(\d+)/", line)
        assert match and match[1] == PRETRAIN, line
        conn = http.client.HTTPConnection("127.0.0.1", int(match[2]), timeout=30)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read()) == {"status": "ok", "model": PRETRAIN}
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
