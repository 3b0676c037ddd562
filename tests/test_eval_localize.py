"""Localization score and segmentation probe: hand-checked IoUs, the mask data, a probe that must learn."""
import numpy as np
import pytest
import torch
from PIL import Image

from stellar.eval.localize import (MaskedImages, evaluate_localization, masked_images, object_ious, prepare_mask,
                                   segments)
from stellar.eval.segment import confusion, miou, probe_miou, train_probe


def test_iou_of_a_map_equal_to_the_mask_is_one_and_of_a_disjoint_map_zero():
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[2:6, 1:4] = 3                                   # one object of 12 px
    obj = (mask == 3).float()
    maps = torch.stack([obj, 1 - obj])[None]             # concept 0 = the object, concept 1 = the rest
    seg = segments(maps, 8)[0]
    (best, area, frac), = object_ious(seg, mask)
    assert best == 1.0 and area == 12 and frac == 12 / 64
    # Maps disjoint from the object (thresholded: with argmax every pixel belongs to some concept): IoU 0.
    away = torch.zeros(2, 8, 8)
    away[0, 6:, 6:] = 1
    away[1] = 1 - obj - away[0]
    (best, _, _), = object_ious(segments(away[None], 8, threshold=0.5)[0], mask)
    assert best == 0.0
    # Half the object: |O n S| = 6, |O u S| = 12 -> 0.5.
    half = obj.clone()
    half[2:4] = 0
    (best, _, _), = object_ious(segments(torch.stack([half, 1 - half])[None], 8)[0], mask)
    assert best == pytest.approx(0.5)


def test_segments_follow_the_rule_and_ignore_pixels_count_nowhere():
    maps = torch.tensor([[[[0.9, 0.2], [0.4, 0.1]], [[0.1, 0.8], [0.6, 0.9]]]])     # 1 x 2 x 2 x 2
    argmax = segments(maps, 2)[0]
    assert argmax[0].tolist() == [[True, False], [False, False]] and argmax[1].tolist() == [[False, True], [True, True]]
    thr = segments(maps, 2, threshold=0.5)[0]
    assert thr[0].tolist() == [[True, False], [False, False]] and thr[1].tolist() == [[False, True], [True, True]]
    assert segments(maps, 2, threshold=0.95)[0].sum() == 0
    up = segments(maps, 8)
    assert up.shape == (1, 2, 8, 8) and (up.sum(1) == 1).all()                     # argmax: a partition
    mask = torch.tensor([[1, 255], [1, 0]])
    seg = torch.tensor([[[True, True], [True, False]]])                              # covers 1, 255 and 1
    (best, area, frac), = object_ious(seg, mask)
    assert best == 1.0 and area == 2 and frac == 2 / 3                               # 255 is in neither set


def test_masks_are_cropped_like_the_images():
    mask = torch.zeros(10, 14, dtype=torch.long)
    mask[:, 2:12] = 1                                        # the centre 10 x 10 square
    assert (prepare_mask(mask, 10) == 1).all()
    assert prepare_mask(mask, 5).shape == (5, 5)


class MapModel(torch.nn.Module):
    """encode(): L = one-hot of 'bright' vs 'dark' patches (4 x 4 patches): a perfect two-concept localizer."""

    def __init__(self, noisy=False):
        super().__init__()
        self.noisy = noisy
        self.w = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        B = x.shape[0]
        patches = x.mean(1).unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2)).flatten(1)     # B x N
        bright = (patches > 0.5).float()
        if self.noisy:
            bright = bright[:, torch.randperm(bright.shape[1], generator=torch.Generator().manual_seed(0))]
        L = torch.stack([bright, 1 - bright], -1)                                          # B x N x 2
        return {"L": L, "Z": L @ torch.eye(2, 3), "dense": L @ torch.eye(2, 3)}


def square_images(root, n=4, size=32, ext=".png", nested=False):
    """Dark images with one bright 16 x 16 square (aligned to the 4-px patches) and its PNG mask."""
    (root / "img" / ("sub" if nested else "")).mkdir(parents=True, exist_ok=True)
    (root / "masks" / "deep").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        y, x = 4 * rng.integers(0, 4, size=2)
        img = np.full((size, size, 3), 30, np.uint8)
        img[y:y + 16, x:x + 16] = 220
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + 16, x:x + 16] = 7
        Image.fromarray(img).save(root / "img" / ("sub" if nested else "") / f"im{i}{ext}")
        Image.fromarray(mask).save(root / "masks" / "deep" / f"im{i}.png")


def test_localization_on_a_folder_with_masks(tmp_path):
    square_images(tmp_path, nested=True)
    data = masked_images(tmp_path / "img", split=None, masks=tmp_path / "masks")
    assert len(data) == 4
    res = evaluate_localization(MapModel(), data, 32)
    # Not exactly 1: the bilinear upsampling of L rounds the squares' corners off by a few pixels.
    assert 0.97 < res["miou"] < 1 and res["num_objects"] == 4 and res["whole_image"] == pytest.approx(256 / 1024)
    worse = evaluate_localization(MapModel(noisy=True), data, 32)
    assert worse["miou"] < 0.9
    (tmp_path / "masks" / "deep" / "im3.png").unlink()
    with pytest.raises(ValueError, match="have no mask"):
        masked_images(tmp_path / "img", split=None, masks=tmp_path / "masks")
    with pytest.raises(ValueError, match="shapes layout"):
        masked_images(tmp_path / "img", split="val")


def test_shapes_layout_reads_masks_with_the_kind_names(tmp_path):
    from stellar.data.shapes import KINDS, generate_shapes_dataset

    root = generate_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=3, size=32)
    data = masked_images(root, "val")
    assert len(data) == 3 and data.classes == list(KINDS)
    image, mask = data.at(16)[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and 0 <= int(mask.min()) and int(mask.max()) <= 8
    assert (mask > 0).any()


def test_confusion_and_miou_hand_checked():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    conf = confusion(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    mean, per = miou(conf)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: 2 / 3; class 2: 0 / 1.
    assert per == pytest.approx([1 / 3, 2 / 3, 0.0]) and mean == pytest.approx(1 / 3)
    assert miou(torch.tensor([[5, 0], [0, 0]]))[1] == [1.0, None]


def test_segmentation_probe_learns_a_linear_task():
    g = torch.Generator().manual_seed(0)
    M, grid, K = 24, (4, 4), 3
    labels = torch.randint(0, K, (M, 16), generator=g)                       # a class per patch
    feats = torch.nn.functional.one_hot(labels, K).float() @ torch.randn(K, 12, generator=g) * 3
    feats = feats + 0.05 * torch.randn(M, 16, 12, generator=g)
    masks = labels.view(M, 1, 4, 1, 4, 1).expand(M, 1, 4, 4, 4, 4).reshape(M, 16, 16)     # 4x4 px per patch
    probe = train_probe(feats, masks, grid, K, epochs=10, lr=5e-2, batch_size=24)
    mean, _ = probe_miou(probe, feats, masks, grid, K)
    assert mean > 0.9
    shuffled = train_probe(feats, masks[torch.randperm(M, generator=g)], grid, K, epochs=10, lr=5e-2, batch_size=24)
    assert probe_miou(shuffled, feats, masks, grid, K)[0] < mean - 0.3
