"""The eval commands end to end on a tiny model trained here: a summary line last, a JSON beside the
checkpoint, the feature cache, `stellar extract`, `stellar plot`, and localization that training improves."""
import json

import pytest
import torch
from safetensors import safe_open

from stellar import cli

STEPS = 12          # localization is already clearly above its random init after a few steps (0.28 -> 0.36)
TINY = ["model.img_size=32", "model.dim=32", "model.depth=1", "model.heads=2", "model.num_tokens=4",
        "model.decoder={dim: 32, depth: 1, heads: 2, mlp_dim: 64}",
        "model.clustering={hidden: 32, bottleneck: 16, prototypes: 32}",
        "data.global_size=32", "data.local_size=16", "data.num_workers=0", "train.batch_size=8",
        "log.progress=false", "log.tensorboard=false", "eval.num_workers=0", "eval.batch_size=32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from stellar.data.shapes import generate_shapes_dataset
    from stellar.train import load_config, pretrain

    tmp = tmp_path_factory.mktemp("eval_cli")
    root = generate_shapes_dataset(tmp / "shapes", n_train=64, n_val=24, size=48)
    cfg = load_config("tiny", [*TINY, f"data.root={root}", f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}",
                               "train.device=cpu"])
    pretrain(cfg, tmp / "run")
    return tmp / "run", root


def call(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.strip()]
    return rc, lines, out.err


def result(run, name):
    from stellar.train.checkpoint import resolve_checkpoint

    return json.loads((resolve_checkpoint(run) / f"eval_{name}.json").read_text())


def test_trained_model_localizes_better_than_its_random_init(run, capsys):
    run_dir, root = run
    rc, lines, _ = call(capsys, "eval", "localize", "--checkpoint", run_dir, "--data", root, "--device", "cpu")
    assert rc == 0 and lines[-1].startswith("localize: mIoU ")
    rec = result(run_dir, "localize")
    trained, init = rec["result"]["trained"], rec["result"]["init"]
    assert rec["step"] == STEPS and trained["num_objects"] == init["num_objects"] > 24
    assert trained["miou"] > init["miou"]
    assert f"{trained['miou']:.3f} trained vs {init['miou']:.3f} at init" in lines[-1]


def test_knn_and_linear_reuse_their_cached_features(run, capsys):
    run_dir, root = run
    argv = ("eval", "knn", "--checkpoint", run_dir, "--data", root, "--device", "cpu")
    rc, lines, _ = call(capsys, *argv)
    assert rc == 0 and lines[-1].startswith("kNN top-1 ") and "64 train / 24 val images" in lines[-1]
    first = result(run_dir, "knn")["result"]["accuracy"]
    assert not any("from the cache" in line for line in lines)
    rc, lines, _ = call(capsys, *argv)
    assert sum("from the cache" in line for line in lines) == 2 and result(run_dir, "knn")["result"]["accuracy"] == first
    assert len(list((run_dir / "eval_cache").iterdir())) == 2                       # train and val
    rc, lines, _ = call(capsys, "eval", "linear", "--checkpoint", run_dir, "--data", root, "--device", "cpu",
                        "--epochs", "2")
    assert rc == 0 and lines[-1].startswith("linear probe top-1 ") and any("from the cache" in line for line in lines)
    assert 0 <= result(run_dir, "linear")["result"]["accuracy"] <= 1


def test_recon_segment_extract_and_plot(run, capsys, tmp_path):
    run_dir, root = run
    rc, lines, _ = call(capsys, "eval", "recon", "--checkpoint", run_dir, "--data", root, "--device", "cpu",
                        "--out", tmp_path / "grid.png", "--grid-images", "4")
    assert rc == 0 and lines[-1].startswith("recon: PSNR ") and "LPIPS n/a" in lines[-1]
    res = result(run_dir, "recon")["result"]
    assert res["num_images"] == 24 and 0 < res["ssim"] < 1 and 0 < res["psnr"] < 60 and (tmp_path / "grid.png").is_file()
    rc, _, err = call(capsys, "eval", "recon", "--checkpoint", run_dir, "--data", root, "--device", "cpu",
                      "--lpips-weights", tmp_path / "absent.pth")
    assert rc == 2 and "--lpips-weights" in err

    rc, lines, _ = call(capsys, "eval", "segment", "--checkpoint", run_dir, "--data", root, "--device", "cpu",
                        "--epochs", "1", "--max-train", "32")
    assert rc == 0 and lines[-1].startswith("segment: mIoU Z ")
    seg = result(run_dir, "segment")["result"]
    assert seg["num_classes"] == 9 and 0 < seg["Z"]["miou"] <= 1 and 0 < seg["dense"]["miou"] <= 1

    out = tmp_path / "feats.safetensors"
    rc, lines, _ = call(capsys, "extract", "--checkpoint", run_dir, "--data", root, "--split", "val", "--out", out,
                        "--device", "cpu")
    assert rc == 0 and lines[-1].startswith("extract: 24 images -> ")
    with safe_open(str(out), "pt") as f:
        assert sorted(f.keys()) == ["L", "Z", "cls", "label", "sparse"]
        meta = f.metadata()
        S, L, Z, cls = (f.get_tensor(k) for k in ("sparse", "L", "Z", "cls"))
    paths = json.loads(meta["paths"])
    assert len(paths) == 24 and json.loads(meta["step"]) == STEPS
    from stellar.data.folder import decode_image
    from stellar.eval.knn import prepare_images
    from stellar.train.checkpoint import load_pretrained

    model, _, _ = load_pretrained(run_dir)
    with torch.no_grad():
        want = model.encode(prepare_images([decode_image(root / "val" / paths[5])], 32))
    torch.testing.assert_close(S[5:6], want["sparse"])
    torch.testing.assert_close(L[5:6], want["L"])
    torch.testing.assert_close(Z[5:6], want["Z"])
    torch.testing.assert_close(cls[5:6], want["cls"][:, 0])
    assert not (tmp_path / "feats.safetensors.parts").exists()

    rc, lines, _ = call(capsys, "plot", run_dir, "--out", tmp_path / "curves.png")
    assert rc == 0 and lines[-1].startswith("curves: ") and (tmp_path / "curves.png").stat().st_size > 1000
