"""Tests for the BEiT-geometric relative position bias resampling and the abs pos embed resize."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.interpolate
import torch
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq

from simmim.checkpoint.resample import resample_rel_pos_bias
from simmim.models.layers import resize_abs_pos_embed

# Window changes used by the published fine-tuning recipes (6->7: 11x11 -> 13x13, 12->14: 23x23 -> 27x27).
GROW_CASES = [(6, 7), (12, 14)]


def _bisect_ratio(n: int, target: int) -> float:
    """The test's own transcription of BEiT's bisection (last midpoint), used where exact q matters."""
    lo, hi = 1.01, 1.5
    q = lo
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if sum(q**i for i in range(n)) > target:
            hi = q
        else:
            lo = q
    return q


def _coords(q: float, n: int) -> np.ndarray:
    """Source positions 0, ±1, ±(1+q), ±(1+q+q^2), ... for a table of side 2n+1."""
    dist = np.cumsum([q**i for i in range(n)])
    return np.concatenate([-dist[::-1], [0.0], dist])


def _targets(dst_size: int) -> np.ndarray:
    """Integer target positions -(dst//2) .. dst//2."""
    half = dst_size // 2
    return np.arange(-half, half + 1, dtype=np.float64)


def _table_from_function(f, xs: np.ndarray, n_heads: int) -> torch.Tensor:
    """Table rows in (dy, dx) row-major order, head h holding f(x, y) + h."""
    y, x = np.meshgrid(xs, xs, indexing="ij")
    return torch.from_numpy(np.stack([f(x, y) + h for h in range(n_heads)], axis=-1).reshape(-1, n_heads))


def _smooth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth and deliberately asymmetric in x and y, so a transposed result would be caught."""
    return np.sin(0.23 * x + 0.4) * np.cos(0.11 * y) + 0.01 * x * y + 0.05 * y


@pytest.mark.parametrize(("src_w", "dst_w"), GROW_CASES)
def test_matches_smooth_function_at_targets(src_w: int, dst_w: int) -> None:
    src, dst = 2 * src_w - 1, 2 * dst_w - 1
    n = src // 2
    # q from a root finder rather than bisection: an independent route to the geometric positions.
    q = brentq(lambda r: sum(r**i for i in range(n)) - dst // 2, 1.0001, 1.5, xtol=1e-14)
    xs = _coords(q, n)
    table = _table_from_function(_smooth, xs, n_heads=2).float()
    out = resample_rel_pos_bias(table, src_w, dst_w).double().numpy()
    t = _targets(dst)
    ty, tx = np.meshgrid(t, t, indexing="ij")
    for h in range(2):
        expected = (_smooth(tx, ty) + h).reshape(-1)
        err = np.abs(out[:, h] - expected).max()
        assert err < 1e-3 * np.ptp(expected), f"head {h}: max error {err}"


def _separable_not_a_knot(z: np.ndarray, coords: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Reference bicubic: 1-D not-a-knot CubicSpline along x, then along y.

    With s=0, FITPACK's regrid places its knots at the data points minus the second and second-to-last,
    i.e. the not-a-knot interpolating spline; a tensor-product spline is separable, so interpolating
    rows then columns gives the same surface. CubicSpline builds it as piecewise polynomials from a
    banded solve, not through FITPACK's B-spline routines, so this is a genuinely independent
    computation. FITPACK clamps evaluation points to the data range (interp2d's "nearest"
    extrapolation), which the targets reproduce by clipping.
    """
    t = np.clip(targets, coords[0], coords[-1])
    along_x = CubicSpline(coords, z, axis=1, bc_type="not-a-knot")(t)
    return CubicSpline(coords, along_x, axis=0, bc_type="not-a-knot")(t)


@pytest.mark.parametrize(("src_w", "dst_w"), [*GROW_CASES, (7, 6), (6, 24)])
def test_matches_independent_cubic_spline(src_w: int, dst_w: int) -> None:
    src, dst = 2 * src_w - 1, 2 * dst_w - 1
    n_heads = 3
    table = torch.randn(src * src, n_heads, generator=torch.Generator().manual_seed(src_w * 100 + dst_w))
    out = resample_rel_pos_bias(table, src_w, dst_w).numpy()
    coords = _coords(_bisect_ratio(src // 2, dst // 2), src // 2)
    for h in range(n_heads):
        z = table[:, h].double().numpy().reshape(src, src)
        ref = _separable_not_a_knot(z, coords, _targets(dst)).reshape(-1)
        np.testing.assert_allclose(out[:, h], ref, atol=2e-5, rtol=1e-5)


# Outputs of the official code (microsoft/SimMIM `remap_pretrained_keys_swin`, i.e. interp2d cubic) run
# under SciPy 1.13.1 on table[k, h] = sin(0.37 k + h) + 0.1 h (float32), at a few row indices. Our
# function matched that run bit for bit on these and on random tables (6->7, 12->14, 7->6, 3->12, 6->24).
GOLDEN = {
    (6, 7): {
        0: (-3.0030978450668044e-05, 0.9414451718330383),
        1: (0.2542494237422943, 1.051300048828125),
        16: (-1.0757044553756714, 0.17898747324943542),
        84: (-0.20733642578125, -0.8352099061012268),
        167: (0.15999417006969452, 1.017183542251587),
        168: (0.4056847095489502, 1.0882973670959473),
    },
    (12, 14): {
        0: (-4.2202807792014675e-17, 0.9414709806442261),
        1: (0.2633025050163269, 1.0542917251586914),
        30: (0.5937491655349731, -0.5218926668167114),
        364: (-0.28655368089675903, -0.8610088229179382),
        727: (0.30980077385902405, 1.0677120685577393),
        728: (0.5490736365318298, 1.099945306777954),
    },
}


def _golden_input(src: int) -> torch.Tensor:
    k = np.arange(src * src)[:, None]
    h = np.arange(2)[None, :]
    return torch.from_numpy((np.sin(0.37 * k + h) + 0.1 * h).astype(np.float32))


@pytest.mark.parametrize(("src_w", "dst_w"), GROW_CASES)
def test_matches_official_interp2d_outputs(src_w: int, dst_w: int) -> None:
    out = resample_rel_pos_bias(_golden_input(2 * src_w - 1), src_w, dst_w)
    for row, expected in GOLDEN[(src_w, dst_w)].items():
        np.testing.assert_allclose(
            out[row].numpy(), np.array(expected, dtype=np.float32), rtol=1e-6, atol=1e-7
        )


def test_matches_interp2d_when_scipy_still_has_it() -> None:
    x = np.arange(4.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scipy.interpolate.interp2d(x, x, np.zeros((4, 4)), kind="cubic")
    except (AttributeError, NotImplementedError):
        pytest.skip(f"scipy {scipy.__version__} has no interp2d (removed in 1.14)")
    src, dst = 11, 13
    table = torch.randn(src * src, 2, generator=torch.Generator().manual_seed(0))
    coords = _coords(_bisect_ratio(src // 2, dst // 2), src // 2)
    out = resample_rel_pos_bias(table, 6, 7).numpy()
    for h in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            f = scipy.interpolate.interp2d(
                coords, coords, table[:, h].numpy().reshape(src, src), kind="cubic"
            )
            ref = f(_targets(dst), _targets(dst)).astype(np.float32).reshape(-1)
        np.testing.assert_array_equal(out[:, h], ref)


def test_identity_when_window_unchanged() -> None:
    table = torch.randn(121, 4)
    assert resample_rel_pos_bias(table, 6, 6) is table
    beit = torch.randn(27 * 27 + 3, 12)
    assert resample_rel_pos_bias(beit, 14, 14, extra_tokens=3) is beit


def test_beit_extra_rows_kept_at_the_end() -> None:
    table = torch.randn(23 * 23 + 3, 6)
    out = resample_rel_pos_bias(table, 12, 14, extra_tokens=3)
    assert out.shape == (27 * 27 + 3, 6)
    torch.testing.assert_close(out[-3:], table[-3:], rtol=0, atol=0)
    torch.testing.assert_close(out[:-3], resample_rel_pos_bias(table[:-3], 12, 14), rtol=0, atol=0)


@pytest.mark.parametrize(("src_w", "dst_w", "rows"), [(6, 7, 169), (12, 14, 729), (7, 6, 121)])
@pytest.mark.parametrize("n_heads", [3, 4, 32])
def test_output_shapes_and_dtype(src_w: int, dst_w: int, rows: int, n_heads: int) -> None:
    table = torch.randn((2 * src_w - 1) ** 2, n_heads, dtype=torch.float64)
    out = resample_rel_pos_bias(table, src_w, dst_w)
    assert out.shape == (rows, n_heads)
    assert out.dtype == torch.float64


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected 11\\*\\*2"):
        resample_rel_pos_bias(torch.randn(120, 4), 6, 7)
    with pytest.raises(ValueError, match="src_window >= 3"):
        resample_rel_pos_bias(torch.randn(9, 4), 2, 7)


def test_abs_pos_embed_resize_keeps_cls_and_shapes() -> None:
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = resize_abs_pos_embed(pos, (16, 16), num_extra_tokens=1)
    assert out.shape == (1, 1 + 16 * 16, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1], rtol=0, atol=0)
    # A constant grid stays constant under bicubic resizing: checks the grid/channel layout round trip.
    flat = torch.ones(1, 12 * 12, 4) * torch.arange(4.0)
    torch.testing.assert_close(resize_abs_pos_embed(flat, (6, 9)), torch.ones(1, 54, 4) * torch.arange(4.0))


def test_abs_pos_embed_identity_and_non_square() -> None:
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_abs_pos_embed(pos, (14, 14), num_extra_tokens=1) is pos
    rect = torch.randn(1, 6 * 8, 4, dtype=torch.float16)
    out = resize_abs_pos_embed(rect, (3, 4), old_grid=(6, 8))
    assert out.shape == (1, 12, 4) and out.dtype == torch.float16
    with pytest.raises(ValueError, match="not a square grid"):
        resize_abs_pos_embed(rect, (3, 4))


def test_absolute_positions_at_another_input_size_equal_the_checkpoint_resize(randomize):
    """A Swin run on a larger input resizes its absolute positions as a checkpoint loaded into a model
    built for that size does (one function for both)."""
    from simmim.checkpoint.transfer import load_weights
    from simmim.zoo import build_model, get_spec

    spec = get_spec("swin-nano_test-64px")
    settings = {"ape": True, "drop_path_rate": 0.0, "window_size": 2}  # windows that fit every stage at both sizes
    small = randomize(build_model(spec, **settings)).eval()
    large = build_model(spec, **settings, img_size=128).eval()
    assert load_weights(large, small.state_dict()).resampled == ["encoder.absolute_pos_embed"]
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(small.encoder.embed(images), large.encoder.embed(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(small(images), large(images), rtol=1e-5, atol=1e-5)
