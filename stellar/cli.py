"""The `stellar` command.

    stellar pretrain --config FILE --out DIR [key=value ...]
    stellar pretrain --resume DIR [key=value ...]
    stellar eval knn --checkpoint DIR          (also: linear, recon, localize, segment)
    stellar extract --checkpoint DIR --data IMAGES --out feats.safetensors
    stellar plot DIR
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
    if not _is_main_process():                         # under torchrun: rank 0 reports
        return 0
    print(f"done: {result.step} steps in {result.seconds:.1f} s")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  metrics:    {result.metrics}")
    print(f"  tensorboard: {Path(result.out_dir) / 'tb'}")
    return 0


def _eval_cfg(cfg: dict) -> dict:
    """The run's `eval:` section over the current defaults (runs saved before a key existed lack it)."""
    from stellar.train.config import DEFAULTS_PATH, read_yaml

    return {**read_yaml(DEFAULTS_PATH)["eval"], **(cfg.get("eval") or {})}


def _eval_settings(cfg: dict, args) -> dict:
    ev = _eval_cfg(cfg)
    return {"image_size": args.image_size or ev["image_size"] or cfg["data"]["global_size"],
            "batch_size": args.batch_size or ev["batch_size"]}


def _load_for_eval(args):
    """(model, config, step, checkpoint dir, device) of ``--checkpoint`` on ``--device``."""
    from stellar.eval.features import resolve_device
    from stellar.train.checkpoint import load_pretrained, resolve_checkpoint

    device = resolve_device(args.device)
    model, cfg, step = load_pretrained(args.checkpoint, device)
    return model, cfg, step, resolve_checkpoint(args.checkpoint), device


def _initial_model(cfg: dict, device):
    """The weights the run started from: its seed, then build_model (with model.init, if set)."""
    from stellar.model import build_model
    from stellar.train.trainer import seed_everything

    seed_everything(int(cfg["seed"]))
    return build_model(cfg["model"]).to(device).eval()


def _write_result(checkpoint: Path, name: str, result: dict, step: int, **extra) -> Path:
    """``CHECKPOINT/eval_<name>.json``: the result, the step and the settings that produced it."""
    path = Path(checkpoint) / f"eval_{name}.json"
    record = {"command": f"stellar eval {name}", "checkpoint": str(checkpoint), "step": step,
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra, "result": result}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return path


def _is_main_process() -> bool:
    """False on ranks other than 0 of a torchrun launch (RANK is set before any process group exists)."""
    import os

    return int(os.environ.get("RANK", 0)) == 0


def _extract_kwargs(args, cfg: dict, checkpoint: Path) -> dict:
    ev = _eval_cfg(cfg)
    cache_dir = None
    if not args.no_cache:
        cache_dir = args.cache_dir or ev["cache_dir"] or (_run_dir_of(checkpoint) / "eval_cache")
    return {"cache_dir": cache_dir, "checkpoint": checkpoint, "progress": True, "amp": args.amp,
            "num_workers": ev["num_workers"] if args.num_workers is None else args.num_workers}


def _run_dir_of(checkpoint: Path) -> Path:
    """RUN for RUN/checkpoints/step_N, else the checkpoint directory itself."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def cmd_eval_knn(args) -> int:
    from stellar.eval.features import eval_process_group
    from stellar.eval.knn import evaluate_knn

    model, cfg, step, ckpt, device = _load_for_eval(args)
    ev, ecfg = _eval_settings(cfg, args), _eval_cfg(cfg)
    with eval_process_group(device):
        res = evaluate_knn(model, args.data, ev["image_size"], k=args.k or ecfg["knn_k"],
                           temperature=args.temperature or ecfg["knn_temperature"], batch_size=ev["batch_size"],
                           device=device, max_train=args.max_train, **_extract_kwargs(args, cfg, ckpt))
    if res is None:
        return 0
    path = _write_result(ckpt, "knn", res, step, data=args.data, image_size=ev["image_size"])
    print(f"results: {path}")
    print(f"kNN top-1 {100 * res['accuracy']:.2f} % (k={res['k']}, T={res['temperature']}, "
          f"{res['num_train']} train / {res['num_val']} val images, {res['num_classes']} classes, step {step})")
    return 0


def cmd_eval_linear(args) -> int:
    from stellar.eval.features import eval_process_group
    from stellar.eval.linear import evaluate_linear

    model, cfg, step, ckpt, device = _load_for_eval(args)
    ev, ecfg = _eval_settings(cfg, args), _eval_cfg(cfg)
    with eval_process_group(device):
        res = evaluate_linear(model, args.data, ev["image_size"], epochs=args.epochs or ecfg["linear_epochs"],
                              lr=ecfg["linear_lr"], batch_size=ecfg["linear_batch_size"],
                              feature_batch_size=ev["batch_size"], device=device, **_extract_kwargs(args, cfg, ckpt))
    if res is None:
        return 0
    path = _write_result(ckpt, "linear", res, step, data=args.data, image_size=ev["image_size"])
    print(f"results: {path}")
    print(f"linear probe top-1 {100 * res['accuracy']:.2f} % (train {100 * res['train_accuracy']:.2f} %, "
          f"{res['epochs']} epochs, step {step})")
    return 0


def _eval_split(data, split: str):
    """The images of DATA/split (DATA itself when it has no such folder); the embedded set by default."""
    from stellar.data.folder import ImageFolderDataset

    if data is None:
        from stellar.data.shapes import ensure_shapes_dataset

        data = ensure_shapes_dataset()
    data = Path(data)
    return ImageFolderDataset(data, split=split if (data / split).is_dir() else None)


def cmd_eval_recon(args) -> int:
    from stellar.eval.features import eval_process_group
    from stellar.eval.recon import evaluate_recon

    model, cfg, step, ckpt, device = _load_for_eval(args)
    ev, ecfg = _eval_settings(cfg, args), _eval_cfg(cfg)
    lpips_weights = args.lpips_weights or ecfg["lpips_weights"]
    inception_weights = args.inception_weights or ecfg["inception_weights"]
    dataset = _eval_split(args.data, args.split)
    if args.max_images is not None and args.max_images < len(dataset):
        import torch

        dataset = torch.utils.data.Subset(dataset, torch.linspace(0, len(dataset) - 1, args.max_images).long().tolist())
    grid = args.out or ckpt / "recon_grid.png"
    with eval_process_group(device):
        res = evaluate_recon(model, dataset, ev["image_size"], batch_size=ev["batch_size"], device=device,
                             lpips_weights=lpips_weights, inception_weights=inception_weights,
                             lpips_net=args.lpips_net or ecfg["lpips_net"], fid_features=args.fid_features,
                             num_workers=ecfg["num_workers"] if args.num_workers is None else args.num_workers,
                             amp=args.amp, grid=grid, grid_images=args.grid_images)
    if res is None:
        return 0
    path = _write_result(ckpt, "recon", res, step, data=args.data, split=args.split,
                         lpips_weights=lpips_weights, inception_weights=inception_weights)
    lp = f"LPIPS {res['lpips']:.4f}" if res["lpips"] is not None else "LPIPS n/a (no --lpips-weights)"
    fid = f"rFID {res['rfid']:.2f}" if res["rfid"] is not None else "rFID n/a (no --inception-weights)"
    print(f"grid:    {res['grid']}")
    print(f"results: {path}")
    print(f"recon: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.4f}, {lp}, {fid} "
          f"({res['num_images']} images at {res['image_size']} px, step {step})")
    return 0


def cmd_eval_localize(args) -> int:
    from stellar.eval.localize import evaluate_localization, masked_images

    if not _is_main_process():
        return 0                                # a small set: one process does it
    model, cfg, step, ckpt, device = _load_for_eval(args)
    ev, ecfg = _eval_settings(cfg, args), _eval_cfg(cfg)
    data = masked_images(args.data, args.split, args.masks)
    threshold = args.threshold if args.threshold is not None else ecfg["localize_threshold"]
    kw = dict(image_size=ev["image_size"], batch_size=ev["batch_size"], device=device, threshold=threshold,
              amp=args.amp)
    trained = evaluate_localization(model, data, **kw)
    init = evaluate_localization(_initial_model(cfg, device), data, **kw)
    res = {"trained": trained, "init": init}
    path = _write_result(ckpt, "localize", res, step, data=args.data, masks=args.masks, split=args.split)
    print(f"results: {path}")
    print(f"localize: mIoU {trained['miou']:.3f} trained vs {init['miou']:.3f} at init (largest object "
          f"{trained['iou_largest']:.3f} vs {init['iou_largest']:.3f}; a whole-image map scores "
          f"{trained['whole_image']:.3f}; {trained['num_objects']} objects in {trained['num_images']} images, "
          f"{trained['rule']}, step {step})")
    return 0


def cmd_eval_segment(args) -> int:
    from stellar.eval.localize import masked_images
    from stellar.eval.segment import evaluate_segmentation

    if not _is_main_process():
        return 0
    model, cfg, step, ckpt, device = _load_for_eval(args)
    ev, ecfg = _eval_settings(cfg, args), _eval_cfg(cfg)
    train, val = masked_images(args.data, "train"), masked_images(args.data, "val")
    if args.max_train is not None and args.max_train < len(train):
        train = type(train)(train.pairs[:: max(1, len(train) // args.max_train)][:args.max_train], classes=train.classes)
    res = evaluate_segmentation(model, train, val, ev["image_size"], epochs=args.epochs or ecfg["segment_epochs"],
                                lr=ecfg["segment_lr"], batch_size=min(ev["batch_size"], 64), device=device,
                                amp=args.amp)
    path = _write_result(ckpt, "segment", res, step, data=args.data)
    print(f"results: {path}")
    print(f"segment: mIoU Z {100 * res['Z']['miou']:.2f} %, dense {100 * res['dense']['miou']:.2f} % "
          f"(linear probes on frozen features, {res['num_classes']} classes, {res['num_train']} train / "
          f"{res['num_val']} val images, {res['epochs']} epochs, step {step})")
    return 0


def cmd_extract(args) -> int:
    import torch

    from stellar.data.folder import ImageFolderDataset
    from stellar.eval.features import FeatureCache, eval_process_group, extract, save_features

    model, cfg, step, ckpt, device = _load_for_eval(args)
    ev, ecfg = _eval_settings(cfg, args), _eval_cfg(cfg)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    dataset = ImageFolderDataset(args.data, split=args.split)
    out = Path(args.out)
    settings = {"kinds": kinds, "image_size": int(ev["image_size"]), "amp": args.amp, "dtype": args.dtype}
    # The chunks of an interrupted run live beside the output until it is complete.
    cache = FeatureCache.for_model(out.with_name(out.name + ".parts"), model, dataset, settings, ckpt)
    with eval_process_group(device):
        feats = extract(model, dataset, kinds, ev["image_size"], ev["batch_size"], device,
                        num_workers=ecfg["num_workers"] if args.num_workers is None else args.num_workers,
                        amp=args.amp, store_dtype=dtype, cache=cache, progress="extract")
    if feats is None:
        return 0
    root = Path(dataset.root).resolve()
    meta = {"checkpoint": str(ckpt), "step": step, "image_size": ev["image_size"], "kinds": kinds,
            "classes": dataset.classes, "paths": [str(Path(p).resolve().relative_to(root)) for p in dataset.paths],
            "root": str(root)}
    save_features(out, feats, meta)
    import shutil

    shutil.rmtree(cache.root, ignore_errors=True)
    shapes = ", ".join(f"{k} {list(feats[k].shape[1:])}" for k in kinds)
    print(f"extract: {len(feats['label'])} images -> {out} ({shapes}, {args.dtype}; "
          f"{out.stat().st_size / 2**20:.1f} MiB, step {step})")
    return 0


def cmd_plot(args) -> int:
    from stellar.eval.plot import plot_metrics, read_columns

    path = plot_metrics(args.run, args.out)
    run = Path(args.run)
    steps, cols = read_columns(run if run.is_file() else run / "metrics.csv")
    print(f"curves: {path} ({len(cols)} panels: {', '.join(cols)}; steps {steps[0]}-{steps[-1]})")
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
DEMO_OUTPUTS = ("checkpoints", "tb", "metrics.csv", "config.yaml", "concept_maps.png", "recon_grid.png", "demo.json",
                DEMO_MARKER)


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
    """Pretrain the tiny config on the embedded data; kNN and localization before/after,
    reconstruction PSNR/SSIM, concept maps and a reconstruction grid; print where."""
    import torch

    from stellar.data.shapes import ensure_shapes_dataset
    from stellar.eval.concept_maps import save_concept_maps
    from stellar.eval.knn import evaluate_knn, load_split, prepare_images
    from stellar.eval.localize import evaluate_localization, masked_images
    from stellar.eval.recon import evaluate_recon, save_recon_grid
    from stellar.train import load_config, pretrain

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

    print("[1/5] embedded dataset ...", flush=True)
    root = Path(cfg["data"]["root"]) if cfg["data"]["root"] else ensure_shapes_dataset()
    print(f"      {root}", flush=True)
    val_masks = masked_images(root, "val")
    loc_args = dict(image_size=size, batch_size=ev["batch_size"], device=device)

    print("[2/5] kNN and localization at random initialisation ...", flush=True)
    init_model = _initial_model(cfg, device)       # the same initial weights the run starts from
    knn_init = evaluate_knn(init_model, root, **knn_args)
    loc_init = evaluate_localization(init_model, val_masks, **loc_args)
    del init_model
    print(f"      kNN top-1 at init: {100 * knn_init['accuracy']:.2f} %, localization mIoU {loc_init['miou']:.3f}",
          flush=True)

    print(f"[3/5] pretraining {cfg['train']['steps']} steps ...", flush=True)
    result = pretrain(cfg, out)
    from stellar.train.checkpoint import load_pretrained

    model, _, _ = load_pretrained(result.checkpoint, device)

    print("[4/5] kNN, localization and reconstruction after training ...", flush=True)
    knn_trained = evaluate_knn(model, root, **knn_args)
    loc_trained = evaluate_localization(model, val_masks, **loc_args)
    recon = evaluate_recon(model, load_split(root, "val"), size, batch_size=ev["batch_size"], device=device,
                           progress=False)
    print(f"      kNN top-1 after training: {100 * knn_trained['accuracy']:.2f} %, localization mIoU "
          f"{loc_trained['miou']:.3f}", flush=True)

    print("[5/5] concept maps and reconstructions ...", flush=True)
    images = prepare_images(_one_image_per_class(load_split(root, "val"), 6), size)
    png = save_concept_maps(model, images, out / "concept_maps.png")
    grid = save_recon_grid(model, prepare_images(_one_image_per_class(load_split(root, "val"), 8), size),
                           out / "recon_grid.png", device=device)

    seconds = time.perf_counter() - t0
    summary = {"knn_init": knn_init["accuracy"], "knn_trained": knn_trained["accuracy"],
               "localization_init": loc_init, "localization_trained": loc_trained,
               "recon": {k: recon[k] for k in ("psnr", "ssim", "num_images", "image_size")},
               "steps": result.step, "train_seconds": result.seconds, "wall_seconds": seconds,
               "final_losses": result.last_losses, "checkpoint": str(result.checkpoint),
               "metrics": str(result.metrics), "tensorboard": str(out / "tb"), "concept_maps": str(png),
               "recon_grid": str(grid), "threads": torch.get_num_threads()}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print()
    print(f"kNN top-1 (k={ev['knn_k']}, {knn_init['num_val']} val images, {knn_init['num_classes']} classes): "
          f"random init {100 * knn_init['accuracy']:.2f} %  ->  trained {100 * knn_trained['accuracy']:.2f} %")
    print(f"localization mIoU ({loc_trained['num_objects']} objects, best concept map per object): "
          f"random init {loc_init['miou']:.3f}  ->  trained {loc_trained['miou']:.3f}  "
          f"(a whole-image map: {loc_trained['whole_image']:.3f})")
    print(f"reconstruction from Z ({recon['num_images']} val images, {size} px): PSNR {recon['psnr']:.2f} dB, "
          f"SSIM {recon['ssim']:.3f}")
    print(f"checkpoint:   {result.checkpoint}")
    print(f"metrics:      {result.metrics}  (TensorBoard: {out / 'tb'})")
    print(f"concept maps: {png}")
    print(f"recon grid:   {grid}")
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

    p = sub.add_parser("eval", help="evaluate a checkpoint (each prints one summary line last and writes "
                                    "CHECKPOINT/eval_<name>.json)")
    esub = p.add_subparsers(dest="eval_command", required=True)
    commands = (("knn", cmd_eval_knn, "kNN on the mean sparse token (k 20, T 0.07)"),
                ("linear", cmd_eval_linear, "linear probe on the mean sparse token"),
                ("recon", cmd_eval_recon, "reconstructions from Z: PSNR, SSIM, LPIPS, rFID, and a grid"),
                ("localize", cmd_eval_localize, "IoU of the objects' masks with the best concept map, "
                                                "trained vs at initialisation"),
                ("segment", cmd_eval_segment, "linear segmentation probes on frozen Z and dense features, mIoU"))
    for name, fn, helptext in commands:
        e = esub.add_parser(name, help=helptext)
        e.add_argument("--checkpoint", required=True, help="a run directory (its latest) or a checkpoint directory")
        e.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU), cpu, cuda:N")
        e.add_argument("--image-size", type=int, default=None, help="default: eval.image_size or data.global_size")
        e.add_argument("--batch-size", type=int, default=None)
        e.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp32"),
                       help="auto: bf16 autocast on CUDA, fp32 on the CPU")
        if name in ("knn", "linear", "recon"):
            e.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: the embedded set)")
            e.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default eval.num_workers)")
        if name in ("knn", "linear"):
            e.add_argument("--cache-dir", default=None, help="feature cache (default eval.cache_dir or RUN/eval_cache)")
            e.add_argument("--no-cache", action="store_true", help="extract the features again, keep nothing")
        if name == "knn":
            e.add_argument("--k", type=int, default=None)
            e.add_argument("--temperature", type=float, default=None)
            e.add_argument("--max-train", type=int, default=None, help="use at most this many training images")
        if name == "linear":
            e.add_argument("--epochs", type=int, default=None)
        if name == "recon":
            e.add_argument("--split", default="val")
            e.add_argument("--max-images", type=int, default=None, help="an evenly spaced subset of the split")
            e.add_argument("--lpips-weights", default=None, help="local LPIPS weights (an lpips.LPIPS state dict, or "
                                                                  "torchvision's AlexNet/VGG16 file); none = no LPIPS")
            e.add_argument("--lpips-net", default=None, choices=("alex", "vgg"))
            e.add_argument("--inception-weights", default=None,
                           help="local torch-fidelity FID InceptionV3 weights (pt_inception-2015-12-05); none = no rFID")
            e.add_argument("--fid-features", type=int, default=2048, choices=(64, 192, 768, 2048))
            e.add_argument("--out", default=None, help="the grid PNG (default CHECKPOINT/recon_grid.png)")
            e.add_argument("--grid-images", type=int, default=8)
        if name in ("localize", "segment"):
            e.add_argument("--data", default=None, help="a root in the shapes layout (images + masks/), default: "
                                                        "the embedded set; localize also takes a folder with --masks")
        if name == "localize":
            e.add_argument("--masks", default=None, help="folder of PNG masks named like the images (any depth)")
            e.add_argument("--split", default="val")
            e.add_argument("--threshold", type=float, default=None,
                           help="concept j covers the pixels where L_j >= t (default: each pixel to its argmax concept)")
        if name == "segment":
            e.add_argument("--epochs", type=int, default=None)
            e.add_argument("--max-train", type=int, default=None)
        e.set_defaults(fn=fn)

    p = sub.add_parser("extract", help="S, L, Z, CLS of every image of a folder, as one safetensors file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a folder of images (class subfolders optional)")
    p.add_argument("--split", default=None, help="a subfolder of --data (train, val)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--kinds", default="sparse,L,Z,cls", help="comma-separated: pooled, cls, sparse, L, Z, dense")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp32"))
    p.set_defaults(fn=cmd_extract)

    p = sub.add_parser("plot", help="the loss curves of a run's metrics.csv as a PNG")
    p.add_argument("run", help="a run directory (or a metrics.csv)")
    p.add_argument("--out", default=None, help="default: RUN/curves.png")
    p.set_defaults(fn=cmd_plot)

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

    p = sub.add_parser("demo", help="pretrain the tiny model on the embedded data; kNN and localization before/after, "
                                    "reconstruction PSNR/SSIM, concept maps and a reconstruction grid")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/tiny.yaml")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["data", "check"]:   # its own parser takes every remaining argument, --help included;
        from stellar.data.check import main as check_main   # before the imports below (torch): it starts fast

        return check_main(argv[2:])
    from stellar.train.config import ConfigError
    from stellar.train.distributed import RankLostError
    from stellar.train.trainer import NonFiniteLossError

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
