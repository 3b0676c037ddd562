"""The `stellar` command.

    stellar pretrain --config FILE --out DIR [key=value ...]
    stellar pretrain --resume DIR [key=value ...]
    stellar eval knn --checkpoint DIR          (also: stellar eval linear --checkpoint DIR)
    stellar viz --checkpoint DIR --images A.jpg B.png ... [--out PNG]
    stellar info
    stellar data check DIR ...
    stellar demo --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


# --------------------------------------------------------------------------- commands

def cmd_pretrain(args) -> int:
    """One process, or every process of a torchrun launch (pretrain starts the process group)."""
    import os

    from stellar.train import load_config, pretrain
    from stellar.train.config import merge, parse_override
    from stellar.train.trainer import saved_config

    if bool(args.config) == bool(args.resume):
        raise SystemExit("stellar pretrain: give either --config FILE --out DIR, or --resume DIR")
    if args.resume:
        run_dir = Path(args.resume)
        cfg = saved_config(run_dir) if (run_dir / "config.yaml").is_file() else None
        if cfg is not None:
            for text in args.overrides:
                cfg = merge(cfg, parse_override(text))
        result = pretrain(cfg, run_dir, resume=True)
    else:
        if not args.out:
            raise SystemExit("stellar pretrain: --out DIR is required with --config")
        result = pretrain(load_config(args.config, args.overrides), args.out)
    if int(os.environ.get("RANK", 0)) != 0:            # under torchrun: rank 0 reports
        return 0
    print(f"done: {result.step} steps in {result.seconds:.1f} s")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  metrics:    {result.metrics}")
    print(f"  tensorboard: {Path(result.out_dir) / 'tb'}")
    return 0


def _eval_settings(cfg: dict, args) -> dict:
    ev = cfg["eval"]
    return {"image_size": args.image_size or ev["image_size"] or cfg["data"]["global_size"],
            "batch_size": args.batch_size or ev["batch_size"]}


def cmd_eval_knn(args) -> int:
    from stellar.eval.knn import evaluate_knn
    from stellar.train.checkpoint import load_pretrained

    model, cfg, step = load_pretrained(args.checkpoint, args.device)
    ev = _eval_settings(cfg, args)
    res = evaluate_knn(model, args.data, ev["image_size"], k=args.k or cfg["eval"]["knn_k"],
                       temperature=args.temperature or cfg["eval"]["knn_temperature"],
                       batch_size=ev["batch_size"], device=args.device, max_train=args.max_train)
    print(f"kNN top-1 {100 * res['accuracy']:.2f} % (k={res['k']}, T={res['temperature']}, "
          f"{res['num_train']} train / {res['num_val']} val images, {res['num_classes']} classes, step {step})")
    return 0


def cmd_eval_linear(args) -> int:
    from stellar.eval.linear import evaluate_linear
    from stellar.train.checkpoint import load_pretrained

    model, cfg, step = load_pretrained(args.checkpoint, args.device)
    ev = _eval_settings(cfg, args)
    res = evaluate_linear(model, args.data, ev["image_size"], epochs=args.epochs or cfg["eval"]["linear_epochs"],
                          lr=cfg["eval"]["linear_lr"], batch_size=cfg["eval"]["linear_batch_size"],
                          feature_batch_size=ev["batch_size"], device=args.device)
    print(f"linear probe top-1 {100 * res['accuracy']:.2f} % (train {100 * res['train_accuracy']:.2f} %, "
          f"{res['epochs']} epochs, step {step})")
    return 0


def cmd_viz(args) -> int:
    from stellar.eval.concept_maps import load_images, save_concept_maps
    from stellar.train.checkpoint import load_pretrained

    model, cfg, _ = load_pretrained(args.checkpoint, args.device)
    size = args.image_size or cfg["eval"]["image_size"] or cfg["data"]["global_size"]
    path = save_concept_maps(model, load_images(args.images, size), args.out)
    print(f"concept maps: {path}")
    return 0


def cmd_info(args) -> int:
    from stellar.info import main

    return main([])


def cmd_data_check(args) -> int:
    from stellar.data.check import main

    return main(args.rest)


def cmd_demo(args) -> int:
    return run_demo(args.out, args.overrides, device=args.device)


# --------------------------------------------------------------------------- the demo

DEMO_MARKER = ".stellar-demo"
DEMO_OUTPUTS = ("checkpoints", "tb", "metrics.csv", "config.yaml", "concept_maps.png", "demo.json", DEMO_MARKER)


def _clear_demo_dir(out: Path) -> None:
    """A previous demo's outputs are replaced; anything else in ``out`` is refused."""
    import shutil

    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / DEMO_MARKER).exists():
        raise SystemExit(f"stellar demo: {out} exists and is not a previous demo's folder; choose another --out")
    for name in DEMO_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _one_image_per_class(dataset, count: int) -> list:
    seen, picked = set(), []
    for i, label in enumerate(dataset.labels):
        if label not in seen:
            seen.add(label)
            picked.append(dataset[i][0])
        if len(picked) == count:
            break
    return picked


def run_demo(out: str | Path, overrides=(), device: str = "cpu") -> int:
    """Pretrain the tiny config on the embedded data, kNN before/after, concept maps; print where."""
    import torch

    from stellar.data.shapes import ensure_shapes_dataset
    from stellar.eval.concept_maps import save_concept_maps
    from stellar.eval.knn import evaluate_knn, load_split, prepare_images
    from stellar.train import load_config, pretrain
    from stellar.train.trainer import default_model_fn, seed_everything

    t0 = time.perf_counter()
    out = Path(out)
    _clear_demo_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("outputs of `stellar demo`; a new demo replaces them\n")
    cfg = load_config("tiny", [f"train.device={device}", *overrides])
    ev = cfg["eval"]
    size = ev["image_size"] or cfg["data"]["global_size"]
    knn_args = dict(image_size=size, k=ev["knn_k"], temperature=ev["knn_temperature"], batch_size=ev["batch_size"],
                    device=device)

    print("[1/4] embedded dataset ...", flush=True)
    root = Path(cfg["data"]["root"]) if cfg["data"]["root"] else ensure_shapes_dataset()
    print(f"      {root}", flush=True)

    print("[2/4] kNN at random initialisation ...", flush=True)
    seed_everything(int(cfg["seed"]))              # the same initial weights the run starts from
    knn_init = evaluate_knn(default_model_fn(cfg["model"]).to(device), root, **knn_args)
    print(f"      kNN top-1 at init: {100 * knn_init['accuracy']:.2f} %", flush=True)

    print(f"[3/4] pretraining {cfg['train']['steps']} steps ...", flush=True)
    result = pretrain(cfg, out)
    from stellar.train.checkpoint import load_pretrained

    model, _, _ = load_pretrained(result.checkpoint, device)
    knn_trained = evaluate_knn(model, root, **knn_args)
    print(f"      kNN top-1 after training: {100 * knn_trained['accuracy']:.2f} %", flush=True)

    print("[4/4] concept maps ...", flush=True)
    images = prepare_images(_one_image_per_class(load_split(root, "val"), 6), size)
    png = save_concept_maps(model, images, out / "concept_maps.png")

    seconds = time.perf_counter() - t0
    summary = {"knn_init": knn_init["accuracy"], "knn_trained": knn_trained["accuracy"],
               "steps": result.step, "train_seconds": result.seconds, "wall_seconds": seconds,
               "final_losses": result.last_losses, "checkpoint": str(result.checkpoint),
               "metrics": str(result.metrics), "tensorboard": str(out / "tb"), "concept_maps": str(png),
               "threads": torch.get_num_threads()}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print()
    print(f"kNN top-1 (k={ev['knn_k']}, {knn_init['num_val']} val images, {knn_init['num_classes']} classes): "
          f"random init {100 * knn_init['accuracy']:.2f} %  ->  trained {100 * knn_trained['accuracy']:.2f} %")
    print(f"checkpoint:   {result.checkpoint}")
    print(f"metrics:      {result.metrics}  (TensorBoard: {out / 'tb'})")
    print(f"concept maps: {png}")
    print(f"wall time:    {seconds:.0f} s (training {result.seconds:.0f} s)")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stellar", description="STELLAR: sparse concept tokens x localization")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model (or resume a run)")
    p.add_argument("--config", help="experiment config: a YAML file or a name in configs/ (tiny, vitb16)")
    p.add_argument("--out", help="run directory (config, checkpoints, metrics.csv, tb/)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = p.add_subparsers(dest="eval_command", required=True)
    for name, fn, helptext in (("knn", cmd_eval_knn, "kNN on the mean sparse token (k 20, T 0.07)"),
                               ("linear", cmd_eval_linear, "linear probe on the mean sparse token")):
        e = esub.add_parser(name, help=helptext)
        e.add_argument("--checkpoint", required=True, help="a run directory (its latest) or a checkpoint directory")
        e.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: the embedded set)")
        e.add_argument("--device", default="cpu")
        e.add_argument("--image-size", type=int, default=None)
        e.add_argument("--batch-size", type=int, default=None)
        if name == "knn":
            e.add_argument("--k", type=int, default=None)
            e.add_argument("--temperature", type=float, default=None)
            e.add_argument("--max-train", type=int, default=None, help="use at most this many training images")
        else:
            e.add_argument("--epochs", type=int, default=None)
        e.set_defaults(fn=fn)

    p = sub.add_parser("viz", help="concept maps of images (PNG)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", default="concept_maps.png")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=None)
    p.set_defaults(fn=cmd_viz)

    p = sub.add_parser("info", help="versions, devices, live fast paths")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("check", help="list undecodable images in a folder", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(fn=cmd_data_check)

    p = sub.add_parser("demo", help="pretrain the tiny model on the embedded data, kNN before/after, concept maps")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/tiny.yaml")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv=None) -> int:
    from stellar.train.config import ConfigError
    from stellar.train.distributed import RankLostError
    from stellar.train.trainer import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["data", "check"]:   # its own parser takes every remaining argument, --help included
        from stellar.data.check import main as check_main

        return check_main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (NonFiniteLossError, RankLostError) as exc:
        print(f"stellar: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, FileExistsError, FileNotFoundError) as exc:
        print(f"stellar: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
