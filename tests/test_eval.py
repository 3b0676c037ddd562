"""Evaluation: kNN against a brute-force formula, the linear probe, features, concept maps."""
import math

import pytest
import torch
from PIL import Image

from stellar.eval.concept_maps import colormap, concept_maps, grid_shape, render_concept_maps, save_concept_maps
from stellar.eval.knn import extract_features, knn_accuracy, knn_predict, prepare_images
from stellar.eval.linear import LinearProbe, probe_accuracy, train_linear_probe


def brute_force_knn(train, labels, test, num_classes, k, temperature):
    """Per test point: cosine to every training point, the k largest, exp(s/T) votes per class."""
    scores = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for t in range(test.shape[0]):
        sims = []
        for m in range(train.shape[0]):
            a, b = test[t].double(), train[m].double()
            sims.append((float(a @ b / (a.norm() * b.norm())), m))
        sims.sort(key=lambda x: -x[0])
        for s, m in sims[:k]:
            scores[t, int(labels[m])] += math.exp(s / temperature)
    return scores


@pytest.mark.parametrize("M,T,D,C,k", [(37, 11, 5, 4, 20), (9, 3, 7, 3, 4), (5, 4, 3, 2, 20)])
def test_knn_matches_brute_force(M, T, D, C, k):
    g = torch.Generator().manual_seed(M * 7 + k)
    train = torch.randn(M, D, generator=g) * torch.rand(M, 1, generator=g) * 3     # unnormalized on purpose
    labels = torch.randint(0, C, (M,), generator=g)
    test = torch.randn(T, D, generator=g)
    got = knn_predict(train, labels, test, C, k=k, temperature=0.07, chunk=4)       # several chunks
    want = brute_force_knn(train, labels, test, C, min(k, M), 0.07)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # Accuracy against labels the kNN never saw, with the brute-force votes' argmax as the prediction.
    test_labels = torch.randint(0, C, (T,), generator=g)
    brute_acc = sum(int(want[t].argmax()) == int(test_labels[t]) for t in range(T)) / T
    assert knn_accuracy(train, labels, test, test_labels, k=k, temperature=0.07, num_classes=C) == pytest.approx(brute_acc)


def test_knn_accuracy_counts_hits_on_a_hand_made_case():
    # Memory on the unit circle; each query's nearest memory point decides (k=1).
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([0, 1, 2, 3])
    test = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-0.9, -0.1], [0.2, -0.9], [0.8, -0.1]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 2, 3, 3]), k=1) == pytest.approx(4 / 5)
    assert knn_accuracy(train, labels, test, torch.tensor([1, 1, 0, 0, 0]), k=1) == pytest.approx(2 / 5)


def test_knn_on_separable_clusters_and_errors():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat(30)
    train = centres[labels] + torch.randn(120, 16, generator=g)
    test_labels = torch.arange(4).repeat(5)
    test = centres[test_labels] + torch.randn(20, 16, generator=g)
    assert knn_accuracy(train, labels, test, test_labels, k=20) == 1.0
    assert knn_accuracy(train, labels[torch.randperm(120, generator=g)], test, test_labels, k=1) < 0.9
    with pytest.raises(ValueError, match="share D"):
        knn_predict(train, labels, test[:, :3], 4)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(train, labels[:5], test, 4)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train, labels, test, 4, k=0)


def test_linear_probe_learns_a_separable_problem():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, generator=g)
    x = torch.randn(300, 8, generator=g)
    y = (x @ w).argmax(1)
    probe = train_linear_probe(x[:200], y[:200], 3, epochs=60, lr=1e-2, batch_size=64)
    assert isinstance(probe, LinearProbe)
    assert isinstance(probe.norm, torch.nn.LayerNorm) and probe.linear.out_features == 3
    assert probe_accuracy(probe, x[200:], y[200:]) > 0.85
    with pytest.raises(ValueError, match="train_features"):
        train_linear_probe(x, y[:5], 3)


class FakeEncoder(torch.nn.Module):
    """encode(): sparse tokens made from image statistics; L a softmax over a fixed projection."""

    def __init__(self, r=3, D=4, patch=4):
        super().__init__()
        self.r, self.D, self.patch = r, D, patch
        self.proj = torch.nn.Linear(3, r * D)

    def encode(self, images):
        B, _, H, W = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p).mean((-1, -2)).flatten(2).transpose(1, 2)   # B x N x 3
        L = torch.softmax(patches @ torch.randn(3, self.r, generator=torch.Generator().manual_seed(0)) * 5, -1)
        sparse = self.proj(images.mean((2, 3))).view(B, self.r, self.D)
        return {"sparse": sparse, "L": L}


def test_extract_features_is_the_mean_sparse_token():
    model = FakeEncoder()
    g = torch.Generator().manual_seed(2)
    data = [((torch.rand(3, 20, 24, generator=g) * 255).to(torch.uint8), i % 3) for i in range(7)]
    feats, labels = extract_features(model, data, image_size=16, batch_size=3)
    images = prepare_images([img for img, _ in data], 16)
    assert images.shape == (7, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(feats, model.encode(images)["sparse"].mean(1))
    assert labels.tolist() == [i % 3 for i in range(7)]


def test_concept_maps_are_L_on_the_patch_grid(tmp_path):
    model = FakeEncoder(r=3, patch=4)
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    maps = concept_maps(model, images)
    L = model.encode(images)["L"]
    h, w = 4, 6
    assert grid_shape(24, 16, 24) == (h, w) and maps.shape == (2, 3, h, w)
    for b, j, i, c in [(0, 0, 0, 0), (1, 2, 3, 5), (0, 1, 2, 1)]:
        assert maps[b, j, i, c] == L[b, i * w + c, j]
    sheet = render_concept_maps(images, maps, tile=20, gap=2)
    assert sheet.size == (2 + 4 * 22, 2 + 2 * (20 + 12 + 2))
    path = save_concept_maps(model, images, tmp_path / "maps.png", tile=20)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == render_concept_maps(images, maps, tile=20).size
    with pytest.raises(ValueError, match="grid"):
        grid_shape(7, 16, 24)


def test_colormap_endpoints():
    c = colormap(torch.tensor([0.0, 1.0, 0.5, -1.0, 2.0]))
    assert c.shape == (5, 3) and 0 <= c.min() and c.max() <= 1
    assert c[0].sum() < 0.1 and c[1].sum() > 2.5
    torch.testing.assert_close(c[3], c[0])
    torch.testing.assert_close(c[4], c[1])


def test_viz_images_are_decoded_like_the_loaders(tmp_path, gen):
    """`stellar viz` reads its images by the reference decode: EXIF orientation applied, 16-bit
    samples by their high byte (Pillow's own convert("RGB") does neither)."""
    import numpy as np

    from stellar.eval.concept_maps import load_images

    stored = torch.randint(0, 256, (6, 6, 3), dtype=torch.uint8, generator=gen).numpy()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif.tobytes())
    deep = torch.randint(0, 65536, (6, 6), generator=gen).numpy().astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "gray16.png")
    got = load_images([tmp_path / "rotated.png", tmp_path / "gray16.png"], 6)  # 6 px: no resize
    upright = torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1)
    assert torch.equal(got[0], upright.float() / 255)
    assert torch.equal(got[1], torch.from_numpy((deep >> 8).astype(np.float32) / 255).expand(3, 6, 6))
