"""Random patch masking (STELLAR.md section 5): counts, order, focal variants, gathering."""
import pytest
import torch

from stellar.model.masking import gather_patches, num_keep, sample_keep_indices


def keep_mask(keep, N):
    m = torch.zeros(keep.shape[0], N, dtype=torch.bool)
    return m.scatter_(1, keep, True)


@pytest.mark.parametrize("grid", [(14, 14), (6, 6), (5, 7), (1, 5)])
@pytest.mark.parametrize("mask_ratio", [0.8, 0.5, 0.25, 0.0])
@pytest.mark.parametrize("focal", [None, "gaussian", "block"])
def test_keeps_exactly_int_n_1_minus_ratio_distinct_sorted(grid, mask_ratio, focal, gen):
    h, w = grid
    N = h * w
    if int(N * (1 - mask_ratio)) < 1:
        pytest.skip("keeps nothing")
    keep = sample_keep_indices(9, h, w, mask_ratio=mask_ratio, focal=focal, focal_prob=0.5, generator=gen)
    assert keep.dtype == torch.int64 and keep.shape == (9, int(N * (1 - mask_ratio)))
    assert (keep >= 0).all() and (keep < N).all()
    assert (keep[:, 1:] > keep[:, :-1]).all()               # sorted, hence distinct


def test_default_counts_are_the_public_codes(gen):
    """int(N * (1 - 0.8)): 1 - 0.8 is 0.19999999999999996, so grids whose N * 0.2 is an integer
    keep one patch fewer than int(N * 0.2) would (10x10: 19, 15x15: 44, 20x20: 79)."""
    assert sample_keep_indices(2, 14, 14, generator=gen).shape == (2, 39)
    expected = {196: 39, 36: 7, 100: 19, 225: 44, 400: 79, 256: 51}
    assert {n: num_keep(n, 0.8) for n in expected} == expected
    assert sample_keep_indices(2, 10, 10, generator=gen).shape == (2, 19)


def test_same_generator_seed_same_masks_and_device_argument():
    a = sample_keep_indices(4, 14, 14, focal="gaussian", generator=torch.Generator().manual_seed(3))
    b = sample_keep_indices(4, 14, 14, focal="gaussian", generator=torch.Generator().manual_seed(3),
                            device="cpu")
    c = sample_keep_indices(4, 14, 14, focal="gaussian", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert b.device == torch.device("cpu")


def test_views_differ_and_cover_the_grid_uniformly(gen):
    keep = sample_keep_indices(400, 6, 6, mask_ratio=0.5, generator=gen)
    assert len({tuple(k.tolist()) for k in keep}) > 390
    freq = keep_mask(keep, 36).float().mean(0)               # each patch kept ~half of the time
    assert (freq - 0.5).abs().max() < 0.12


@pytest.mark.parametrize("focal", ["gaussian", "block"])
def test_focal_prob_zero_is_plain_random(focal):
    plain = sample_keep_indices(6, 14, 14, generator=torch.Generator().manual_seed(1))
    off = sample_keep_indices(6, 14, 14, focal=focal, focal_prob=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, off)


def _spread(keep, h, w):
    """Mean over views of the variance of the kept patches' (row, col) coordinates."""
    rows, cols = (keep // w).double(), (keep % w).double()
    return (rows.var(dim=1) + cols.var(dim=1)).mean()


def test_gaussian_variant_concentrates_kept_patches(gen):
    h = w = 14
    uniform = sample_keep_indices(200, h, w, generator=gen)
    blob = sample_keep_indices(200, h, w, focal="gaussian", focal_prob=1.0, generator=gen)
    half = sample_keep_indices(200, h, w, focal="gaussian", focal_prob=0.5, generator=gen)
    s_u, s_b, s_h = _spread(uniform, h, w), _spread(blob, h, w), _spread(half, h, w)
    # uniform over a 14x14 grid: var ~ 2 x (14^2 - 1) / 12 = 32.5
    assert 28 < s_u < 37
    assert s_b < 0.6 * s_u
    assert s_b < s_h < s_u                                     # half the views biased
    # near the blob centre: the kept centroid's neighbourhood holds most kept patches
    rows, cols = (blob // w).double(), (blob % w).double()
    d2 = (rows - rows.mean(1, keepdim=True)) ** 2 + (cols - cols.mean(1, keepdim=True)) ** 2
    rows_u, cols_u = (uniform // w).double(), (uniform % w).double()
    d2_u = (rows_u - rows_u.mean(1, keepdim=True)) ** 2 + (cols_u - cols_u.mean(1, keepdim=True)) ** 2
    assert (d2 < 9).double().mean() > 1.5 * (d2_u < 9).double().mean()


def test_gaussian_centre_is_a_grid_cell():
    """The blob's centre is an integer cell: every view's bias peaks at exactly exp(0) = 1 on a
    patch (a centre between cells would peak below 1), and the centres spread over the grid."""
    gen = torch.Generator().manual_seed(0)
    from stellar.model import masking

    bias = masking._gaussian_bias(500, 7, 9, gen, "cpu")                     # 500 x 63
    peak = bias.max(dim=1).values
    torch.testing.assert_close(peak, torch.ones(500))                         # exp(0) at the centre cell
    centres = bias.argmax(dim=1)
    assert len(set(centres.tolist())) > 50                                    # centres spread over the grid


def _contains_square(mask_2d, side):
    h, w = mask_2d.shape
    return any(bool(mask_2d[i:i + side, j:j + side].all())
               for i in range(h - side + 1) for j in range(w - side + 1))


def test_block_variant_keeps_a_square_block_and_fills_up(gen):
    keep = sample_keep_indices(20, 14, 14, focal="block", focal_prob=1.0, generator=gen)   # 39 = 36 + 3
    masks = keep_mask(keep, 196).view(20, 14, 14)
    assert all(_contains_square(m, 6) for m in masks)
    plain = keep_mask(sample_keep_indices(20, 14, 14, generator=gen), 196).view(20, 14, 14)
    assert sum(_contains_square(m, 6) for m in plain) == 0


def test_block_variant_exact_square_when_n_keep_is_a_square(gen):
    keep = sample_keep_indices(10, 6, 6, mask_ratio=0.75, focal="block", focal_prob=1.0, generator=gen)  # 9
    for m in keep_mask(keep, 36).view(10, 6, 6):
        rows, cols = m.nonzero(as_tuple=True)
        assert m.sum() == 9 and rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2


def test_block_side_is_capped_by_a_thin_grid(gen):
    keep = sample_keep_indices(5, 2, 10, mask_ratio=0.5, focal="block", focal_prob=1.0, generator=gen)  # 10 of 20
    masks = keep_mask(keep, 20).view(5, 2, 10)
    assert keep.shape == (5, 10) and all(_contains_square(m, 2) for m in masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gather_patches_matches_loop(dtype, gen):
    x = torch.randn(3, 10, 4, generator=gen).to(dtype)
    keep = sample_keep_indices(3, 2, 5, mask_ratio=0.6, generator=gen)
    got = gather_patches(x, keep)
    ref = torch.stack([torch.stack([x[b, int(k)] for k in keep[b]]) for b in range(3)])
    assert got.dtype == dtype and torch.equal(got, ref)
    xg = x.double().requires_grad_(True)
    gather_patches(xg, keep).sum().backward()
    assert torch.equal(xg.grad[..., 0], keep_mask(keep, 10).double())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_keep_indices(2, 4, 4, mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_keep_indices(2, 4, 4, mask_ratio=-0.1)
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_keep_indices(2, 2, 2, mask_ratio=0.8)                  # int(4 * 0.2) = 0
    with pytest.raises(ValueError, match="focal"):
        sample_keep_indices(2, 4, 4, focal="ring")
    with pytest.raises(ValueError, match="focal_prob"):
        sample_keep_indices(2, 4, 4, focal="block", focal_prob=1.5)
    with pytest.raises(ValueError, match="keep"):
        gather_patches(torch.randn(2, 5, 3), torch.zeros(3, 2, dtype=torch.int64))
