"""The kernels of the fused functions (fused.py) and the choices between them: the routes of float32
CPU GEMMs (oneDNN's linear, torch's BLAS through F.linear, or 'mixed': oneDNN for the forward and input
gradients, the BLAS for weight gradients; a dispatch-mode probe, where torch's private one is missing,
assumes a mode is active and takes F.linear), and whether activations are recomputed in the backward.

A training run decides them once, at its start, from `runtime.gemm_route` and `runtime.recompute`
(SIMMIM_GEMM_ROUTE and SIMMIM_RECOMPUTE, when set, override them), calibrating an 'auto' route then,
and installs the result with `use`: its header, config.yaml and checkpoints record what it chose.
Code that builds a model and runs its own loop gets `resolve()` with the defaults (the environment
variables honoured) at first use, once per process, thread count and cache directory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import hardware
from ..errors import UsageError
from ..fsutil import read_json_cache, update_json_cache

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
"""Whether this torch build has oneDNN's linear, the 'onednn' route."""
ROUTE_ENV, ROUTES = hardware.GEMM_ROUTE_ENV, hardware.GEMM_ROUTES
RECOMPUTE_ENV = "SIMMIM_RECOMPUTE"
"""Environment variable: auto, 1 (recompute norm and GELU outputs in the backward) or 0 (keep them)."""
_RECOMPUTE_ENV_VALUES = {"auto": "auto", "1": "recompute", "0": "keep"}
CACHE_FILE = "gemm-route.json"
_CALIBRATION = ((4096, 96), (512, 384))
"""(tokens, width) of the calibration's Swin blocks: the widths of Swin-T/B's first and third stages,
fewer tokens than a batch holds so that the calibration takes a fraction of a second."""


def _dispatch_probe() -> Callable[[], bool]:
    """Whether a dispatch mode (the MAC counter, fake tensors) is active: they expect aten.linear. Where
    torch's private probe is missing, a mode is assumed, which only costs the oneDNN route."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:
        return lambda: True
    return lambda: _get_current_dispatch_mode() is not None


_dispatch_mode_active = _dispatch_probe()


def use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a @ b.T takes oneDNN: the chosen route, where it applies."""
    # autocast and 16-bit GEMMs reach oneDNN through aten.linear; dispatch modes (the MAC counter, fake
    # tensors) expect aten.linear, except under torch.compile, where the custom op has a fake kernel
    if a.device.type != "cpu" or not a.dtype == b.dtype == torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling():
        return ONEDNN and gemm_route() != "aten"
    return not _dispatch_mode_active() and gemm_route() != "aten"


if ONEDNN:
    # Inductor lowers oneDNN's linear only for a constant weight (inference with frozen parameters); as a
    # custom op it stays one opaque kernel call in a training graph
    @torch.library.custom_op("simmim::onednn_linear", mutates_args=())
    def onednn_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """a @ b.T (+ bias) in oneDNN, for torch.compile."""
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")

    @onednn_linear.register_fake
    def _(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return a.new_empty((*a.shape[:-1], b.shape[0]))


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, route: str | None = None
              ) -> torch.Tensor:
    """a @ b.T (+ bias) for a (..., K) and b (N, K); either may be a transposed view. `route` forces
    'onednn' or 'aten'; by default oneDNN where `gemm_route` chose it and it applies (under torch.compile
    through the custom op simmim::onednn_linear)."""
    if route == "onednn" or (route is None and use_onednn(a, b)):
        if torch.compiler.is_compiling():
            return torch.ops.simmim.onednn_linear(a, b, bias)
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return F.linear(a, b, bias)


def weight_grads(x: torch.Tensor, grad: torch.Tensor, needs: tuple[bool, ...], route: str | None = None
                  ) -> tuple[torch.Tensor | None, ...]:
    """Gradients of W and b in y = x W^T + b, with x (M, K) and grad (M, N). Both GEMM operands are
    transposed views here: torch's BLAS reads them in place, while oneDNN copies its first operand when
    it is one, an M-row copy that can cost half the GEMM. So the float32 weight GEMM takes oneDNN only on
    the 'onednn' route (`route` forces one; the calibration times both). Where oneDNN computes it (that
    route, and 16-bit GEMMs, which torch runs in oneDNN) x goes first where it is the narrower one by far;
    W's gradient then comes out transposed, and the strided copy that makes it contiguous (in bf16 a
    strided cast, several times slower than a plain one) is worth it only where it is small beside the
    copy it saves: N x K elements against M x (N - K)."""
    grad_weight = grad_bias = None
    if needs[0]:
        in_onednn = route == "onednn" if route else use_onednn(x, grad) and gemm_route() == "onednn"
        route = "onednn" if in_onednn else "aten"
        (m, k), n = x.shape, grad.shape[1]
        x_first = (route == "onednn" or x.dtype != torch.float32) and k < n and m * (n - k) > 4 * n * k
        grad_weight = (matmul_nt(x.t(), grad.t(), route=route).t() if x_first
                       else matmul_nt(grad.t(), x.t(), route=route))
    if needs[1]:
        grad_bias = grad.sum(0)
    return grad_weight, grad_bias


@dataclass(frozen=True)
class Kernels:
    """What the fused functions compute with, and how each choice was made (for the run's header)."""

    gemm_route: str
    """'onednn', 'mixed' (oneDNN but for weight gradients) or 'aten' (torch's BLAS): the route of float32
    CPU GEMMs."""
    recompute: str
    """'recompute' (norm and GELU outputs recomputed in the backward), 'keep' (kept), or 'auto' (kept
    only for a 16-bit GELU output)."""
    route_why: str = ""
    recompute_why: str = ""

    def describe(self) -> str:
        return (f"fp32 GEMM route {self.gemm_route} ({self.route_why}), "
                f"recompute {self.recompute} ({self.recompute_why})")


_chosen: Kernels | None = None  # installed by a run
_defaults: dict[tuple, Kernels] = {}  # the lazy default, per what can change within a process
_calibrated: dict[tuple[str | None, int], tuple[str, str]] = {}  # ($SIMMIM_CACHE, threads) -> (route, why)


def _requested(name: str, configured: str, env: str, values: dict[str, str]) -> tuple[str, str]:
    """(value, where it came from, e.g. 'runtime.gemm_route=auto'): the environment variable `env`
    where it is set, else the config's `configured`."""
    raw = os.environ.get(env)
    if raw is None:
        return configured, f"runtime.{name}={configured}"
    if raw not in values:
        expected = hardware.GEMM_ROUTE_VALUES if env == ROUTE_ENV else "auto, 1 (recompute) or 0 (keep)"
        raise UsageError(f"{env}={raw!r}: expected {expected}")
    return values[raw], f"{env}={raw}, overriding runtime.{name}={configured}"


def resolve(gemm_route: str = "auto", recompute: str = "auto", calibrate_route: bool = True) -> Kernels:
    """The choices for these config values, the environment variables overriding them; an 'auto'
    route is read from $SIMMIM_CACHE/gemm-route.json for this machine and thread count or calibrated
    (without `calibrate_route`, as for a GPU run, where no float32 CPU GEMMs are routed: 'aten')."""
    route, route_why = _requested("gemm_route", gemm_route, ROUTE_ENV, {r: r for r in ("auto", *ROUTES)})
    mode, mode_why = _requested("recompute", recompute, RECOMPUTE_ENV, _RECOMPUTE_ENV_VALUES)
    if route == "onednn" and not ONEDNN:
        raise UsageError(f"{route_why.split(',')[0]}: this torch build has no oneDNN linear "
                         "(torch.ops.mkldnn._linear_pointwise)")
    if route == "auto":
        if not ONEDNN:
            route, how = "aten", "this torch build has no oneDNN linear"
        elif not calibrate_route:
            route, how = "aten", "no CPU GEMMs to route"
        else:
            route, how = calibrated_route()
        route_why = f"{route_why}: {how}"
    return Kernels(route, mode, route_why, mode_why)


def calibrated_route() -> tuple[str, str]:
    """(route, how it was found) for this machine at the current thread count: remembered in the
    process, else read from the cache file, else calibrated and written there."""
    seen = os.environ.get("SIMMIM_CACHE"), torch.get_num_threads()
    if seen not in _calibrated:
        _calibrated[seen] = _cached_or_calibrated(str(hardware.cache_dir() / CACHE_FILE), hardware.machine_key())
    return _calibrated[seen]


def _cached_or_calibrated(path: str, key: str) -> tuple[str, str]:
    threads = torch.get_num_threads()
    entry = read_json_cache(path).get(key, {})
    route = entry.get("route")
    if route in ROUTES and set(entry.get("seconds", ROUTES)) == set(ROUTES):  # else calibrated among fewer routes
        return route, f"cached in {path} for {threads} thread{'s' if threads > 1 else ''}"
    seconds = calibrate()
    route = min(ROUTES, key=seconds.__getitem__)
    update_json_cache(path, {key: {"route": route, "seconds": seconds}}, "GEMM route cache")
    measured = ", ".join(f"{r} {s * 1e3:.0f} ms" for r, s in seconds.items())
    return route, f"calibrated at {threads} thread{'s' if threads > 1 else ''}: {measured}"


def calibrate(repeats: int = 3) -> dict[str, float]:
    """Seconds per route of the float32 GEMMs of a Swin block's linear layers (qkv, proj, fc1, fc2, as
    `fused.linear` runs them) at the widths of _CALIBRATION: the forward and input gradients, and the
    weight gradients, each timed in oneDNN and in torch's BLAS (the best of `repeats` passes after one
    warm-up, the two alternating), a route's time the sum of its parts. Fixed shapes and inputs from a
    private generator, so that the global random state is untouched."""
    gen = torch.Generator().manual_seed(0)
    layers = [(torch.rand(m, k, generator=gen), torch.rand(n, k, generator=gen), torch.rand(n, generator=gen),
               torch.rand(m, n, generator=gen))
              for m, c in _CALIBRATION for k, n in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c))]

    def forward_and_input_grads(library: str) -> None:
        for x, w, b, g in layers:
            matmul_nt(x, w, b, library)
            matmul_nt(g, w.t(), route=library)

    def weight_gradients(library: str) -> None:
        for x, _, _, g in layers:
            weight_grads(x, g, (True, False), library)

    libraries = ("onednn", "aten")
    best = {(part, library): float("inf") for part in (forward_and_input_grads, weight_gradients)
            for library in libraries}
    for i in range(repeats + 1):
        for part, library in best if i % 2 else list(best)[::-1]:
            start = time.perf_counter()
            part(library)
            if i:  # the first pass warms up (oneDNN builds its primitives)
                best[part, library] = min(best[part, library], time.perf_counter() - start)
    forward = {library: best[forward_and_input_grads, library] for library in libraries}
    weights = {library: best[weight_gradients, library] for library in libraries}
    return {"onednn": forward["onednn"] + weights["onednn"], "mixed": forward["onednn"] + weights["aten"],
            "aten": forward["aten"] + weights["aten"]}


def use(kernels: Kernels | None) -> Kernels | None:
    """Installs `kernels` as this process's choice (None goes back to the lazy default); returns the
    one it replaces, for the caller to put back."""
    global _chosen
    previous, _chosen = _chosen, kernels
    return previous


@contextlib.contextmanager
def using(kernels: Kernels):
    """`kernels` installed for the duration of the block."""
    previous = use(kernels)
    try:
        yield kernels
    finally:
        use(previous)


def current() -> Kernels:
    """The installed choice, else the default one (`resolve()`), resolved once per cache directory,
    thread count and value of the environment variables."""
    if _chosen is not None:
        return _chosen
    seen = (os.environ.get("SIMMIM_CACHE"), torch.get_num_threads(), os.environ.get(ROUTE_ENV),
            os.environ.get(RECOMPUTE_ENV))
    if seen not in _defaults:
        _defaults[seen] = resolve()
    return _defaults[seen]


# read once while torch.compile traces, not traced: the lazy default calibrates and reads the thread count
@torch.compiler.assume_constant_result
def gemm_route() -> str:
    """The float32 CPU GEMM route of this process: 'onednn', 'mixed' or 'aten'."""
    return current().gemm_route


@torch.compiler.assume_constant_result
def recompute_mode() -> str:
    """runtime.recompute as decided for this process: 'auto', 'recompute' or 'keep'."""
    return current().recompute


def recompute(output: str, dtype: torch.dtype) -> bool:
    """Whether `norm_linear` ("norm") or `gelu_linear` ("gelu") recomputes its GEMM's input of `dtype` in
    the backward instead of keeping it. 'recompute' recomputes both, 'keep' keeps both (more memory: an
    activation the size of x per norm, 4x the width per MLP), 'auto' keeps only a 16-bit GELU output:
    under bf16 the GELU's recompute is a larger share of a faster step and the kept activation half the
    bytes, while a norm's recompute is cheap everywhere (docs/kernels.md has the measurements)."""
    mode = recompute_mode()
    if mode == "auto":
        return output == "norm" or dtype.itemsize > 2
    return mode == "recompute"
