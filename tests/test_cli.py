"""The `stellar` command end to end on a tiny model and a tiny generated shapes folder."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from stellar import cli, info
from stellar.train import read_metrics
from stellar.train.checkpoint import latest_checkpoint

TINY = [
    "model.img_size=32", "model.dim=32", "model.depth=1", "model.heads=2", "model.num_tokens=4",
    "model.decoder={dim: 32, depth: 1, heads: 2, mlp_dim: 64}",
    "model.clustering={hidden: 32, bottleneck: 16, prototypes: 32}",
    "data.global_size=32", "data.local_size=16", "data.num_workers=0", "data.backend=reference",
    "train.batch_size=4", "log.progress=false", "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from stellar.data.shapes import ensure_shapes_dataset

    return ensure_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=24, n_val=8, size=40)


def test_pretrain_resume_eval_viz(tmp_path, shapes, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--config", "tiny", "--out", str(run), *TINY, f"data.root={shapes}",
            "train.steps=3", "train.checkpoint_every=2"]
    assert cli.main(args) == 0
    assert latest_checkpoint(run).name == "step_00000003"
    assert (run / "config.yaml").is_file() and (run / "tb").is_dir()
    assert "checkpoint:" in capsys.readouterr().out

    assert cli.main(["pretrain", "--resume", str(run), "train.steps=4"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == [1, 2, 3, 4]

    assert cli.main(["eval", "knn", "--checkpoint", str(run), "--data", str(shapes), "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "24 train / 8 val" in out and "step 4" in out

    assert cli.main(["eval", "linear", "--checkpoint", str(run), "--data", str(shapes), "--epochs", "2"]) == 0
    assert "linear probe top-1" in capsys.readouterr().out

    pictures = sorted(str(p) for p in (shapes / "val").rglob("*.jpg"))[:2]
    png = tmp_path / "maps.png"
    assert cli.main(["viz", "--checkpoint", str(latest_checkpoint(run)), "--images", *pictures, "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]      # 1 + r columns, 2 rows


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["pretrain", "--config", "tiny", "--out", str(tmp_path / "r"), "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert cli.main(["pretrain", "--resume", str(tmp_path / "missing")]) == 2
    assert "cannot resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--config", "tiny"])               # no --out
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--config", "tiny", "--resume", str(tmp_path)])


def test_info_reports_missing_pieces_instead_of_crashing(monkeypatch, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "cuda_available" in out and "kernels:" in out and "extension:" in out

    real = info.importlib.import_module

    def broken(name, *a, **k):
        if name in ("stellar.kernels", "stellar._ext"):
            raise ImportError(f"no {name} here")
        return real(name, *a, **k)

    monkeypatch.setattr(info.importlib, "import_module", broken)
    report = info.collect_info()
    assert report["kernels"]["available"] is False and "no stellar.kernels here" in report["kernels"]["error"]
    assert report["extension"]["available"] is False
    assert "versions" in info.format_info(report)


def test_data_check_is_passed_through(tmp_path, shapes, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "ok.png")
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    cli.main(["data", "check", str(folder)])
    out = capsys.readouterr().out
    assert "2 images, 1 bad" in out


def test_demo_end_to_end(tmp_path, shapes, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), *TINY, f"data.root={shapes}", "train.steps=2", "train.checkpoint_every=2"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "random init" in text and "trained" in text and "wall time" in text
    summary = json.loads((out / "demo.json").read_text())
    assert 0 <= summary["knn_init"] <= 1 and 0 <= summary["knn_trained"] <= 1 and summary["steps"] == 2
    assert (out / "concept_maps.png").is_file() and (out / "metrics.csv").is_file()
    assert cli.main(args) == 0                                    # a second demo replaces the first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path / "other"), *TINY, f"data.root={shapes}", "train.steps=1"])
    assert (tmp_path / "other" / "precious.txt").exists()


def test_python_dash_m_stellar():
    proc = subprocess.run([sys.executable, "-m", "stellar", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "pretrain" in proc.stdout and "demo" in proc.stdout
