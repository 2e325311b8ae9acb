import numpy as np
import pytest
import torch

from simmim.data.masking import MaskGenerator


@pytest.mark.parametrize(
    "input_size, model_patch, side, blocks, masked",
    [(192, 4, 48, 36, 22), (224, 16, 14, 49, 30), (224, 4, 56, 49, 30), (64, 4, 16, 4, 3)],
)
def test_shape_and_exact_count(input_size, model_patch, side, blocks, masked):
    gen = MaskGenerator(input_size, 32, model_patch, 0.6)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (side, side) and mask.dtype == torch.int64
    scale = 32 // model_patch
    block_view = mask.view(side // scale, scale, side // scale, scale)
    # every 32-px block is entirely masked or entirely visible
    assert torch.equal(block_view.amin(dim=(1, 3)), block_view.amax(dim=(1, 3)))
    assert int(block_view[:, 0, :, 0].sum()) == masked == gen.mask_count
    assert blocks == gen.blocks_per_side**2


def test_ratio_rounds_up_like_the_official_code():
    assert MaskGenerator(192, 32, 4, 0.6).mask_count == 22  # 21.6 -> 22, i.e. 61.1 %
    assert MaskGenerator(192, 32, 4, 0.5).mask_count == 18


def test_deterministic_under_seed_and_new_mask_per_sample():
    gen = MaskGenerator(192, 32, 4, 0.6)
    a = gen.batch(8, np.random.default_rng(123))
    b = gen.batch(8, np.random.default_rng(123))
    c = gen.batch(8, np.random.default_rng(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(m.flatten().tolist()) for m in a}) == 8


def test_every_block_is_equally_likely():
    gen = MaskGenerator(96, 32, 4, 0.5)  # 9 blocks, 5 masked
    rng = np.random.default_rng(0)
    freq = torch.stack([gen(rng)[::8, ::8] for _ in range(3000)]).float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 5 / 9), atol=0.04)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=200, mask_patch_size=32), "must divide input_size"),
        (dict(mask_patch_size=30, model_patch_size=4, input_size=180), "multiple of the model's patch size"),
        (dict(mask_ratio=1.0), r"must lie in \(0, 1\)"),
        (dict(mask_ratio=0.0), r"must lie in \(0, 1\)"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskGenerator(**kwargs)
