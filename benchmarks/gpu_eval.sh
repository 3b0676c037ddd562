#!/usr/bin/env bash
# The evaluation's GPU paths, on a lent GPU (part of `make gpu`; alone: bash benchmarks/gpu_eval.sh).
# ~30 s: a random ViT-B/16 STELLAR on a folder of random JPEGs (nothing downloaded):
#   1. feature extraction on CUDA under bf16 autocast (the default) and in fp32, against fp32 on
#      the CPU for the same images (pooled feature and L); images/s with DataLoader workers
#   2. kNN through the feature cache on CUDA (second call must read the cache)
#   3. eval recon on CUDA: PSNR, SSIM, LPIPS and rFID with randomly initialised LPIPS/Inception
#      weights written to local files (skipped, with the reason, without torchmetrics/lpips/torch-fidelity)
# Prints one line last. Knobs: PYTHON, OUT (default runs/gpu/gpu_eval), EVAL_IMAGES (default 512).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-runs/gpu/gpu_eval}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
OUT="$OUT" N="${EVAL_IMAGES:-512}" "$PY" - <<'EOF'
import os, time, math
from pathlib import Path
import numpy as np
import torch
from PIL import Image

from stellar.data.folder import ImageFolderDataset
from stellar.eval.features import FeatureCache, extract
from stellar.eval.knn import evaluate_knn, prepare_images
from stellar.model import build_model

assert torch.cuda.is_available(), "no CUDA device"
out, n = Path(os.environ["OUT"]), int(os.environ["N"])
data = out / "data"
rng = np.random.default_rng(0)
for split, count in (("train", n), ("val", n // 4)):
    for i in range(count):
        d = data / split / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:05d}.jpg"
        if not p.exists():
            Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(p, quality=90)
torch.manual_seed(0)
model = build_model({"arch": "base"}).eval()
ds = ImageFolderDataset(data, split="train")
workers = min(8, len(os.sched_getaffinity(0)))

# 1. values: CUDA bf16 and fp32 against the CPU in fp32, on the first 8 images
sub = torch.utils.data.Subset(ds, list(range(8)))
cpu = extract(model, sub, ("pooled", "L"), 224, 8, "cpu", amp="fp32", progress=False)
model.cuda()
fp32 = extract(model, sub, ("pooled", "L"), 224, 8, "cuda", amp="fp32", progress=False)
bf16 = extract(model, sub, ("pooled", "L"), 224, 8, "cuda", amp="auto", progress=False)
rel = lambda a, b: float((a - b).norm() / b.norm())
r32, r16 = rel(fp32["pooled"], cpu["pooled"]), rel(bf16["pooled"], cpu["pooled"])
l32, l16 = float((fp32["L"] - cpu["L"]).abs().max()), float((bf16["L"] - cpu["L"]).abs().max())
print(f"pooled rel. error vs CPU fp32: cuda fp32 {r32:.2e}, cuda bf16 {r16:.2e}; max |L diff| {l32:.2e}, {l16:.2e}")
ok = r32 < 5e-3 and r16 < 5e-2 and l32 < 5e-3 and l16 < 1e-1

# throughput: every train image, bf16, DataLoader workers decoding and resizing
torch.cuda.synchronize()
t = time.perf_counter()
extract(model, ds, ("pooled",), 224, 128, "cuda", num_workers=workers, progress=False)
torch.cuda.synchronize()
ips = len(ds) / (time.perf_counter() - t)
print(f"extract: {len(ds)} images in {len(ds) / ips:.1f} s = {ips:.0f} img/s ({workers} workers, bf16)")

# 2. kNN through the cache
kw = dict(image_size=224, k=20, batch_size=128, device="cuda", cache_dir=out / "cache", num_workers=workers)
a = evaluate_knn(model, data, **kw)
t = time.perf_counter()
b = evaluate_knn(model, data, **kw)
cached_s = time.perf_counter() - t
print(f"kNN {a['accuracy']:.4f} then {b['accuracy']:.4f} from the cache in {cached_s:.2f} s")
ok = ok and a["accuracy"] == b["accuracy"]

# 3. recon on CUDA with random metric weights
recon = "skipped"
try:
    import lpips, torchvision  # noqa: F401
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from stellar.eval.recon import evaluate_recon

    torch.save(torchvision.models.alexnet(weights=None).state_dict(), out / "alexnet-random.pth")
    real_load = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = real_load
    torch.save(net.state_dict(), out / "inception-random.pth")
    val = ImageFolderDataset(data, split="val")
    t = time.perf_counter()
    res = evaluate_recon(model, val, 224, batch_size=64, device="cuda", lpips_weights=out / "alexnet-random.pth",
                         inception_weights=out / "inception-random.pth", num_workers=workers, progress=False,
                         grid=out / "grid.png")
    s = time.perf_counter() - t
    recon = (f"recon on CUDA: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.4f}, LPIPS {res['lpips']:.4f}, "
             f"rFID {res['rfid']:.3g} (random weights: near 0), {len(val) / s:.0f} img/s")
    ok = ok and all(math.isfinite(res[k]) for k in ("psnr", "ssim", "lpips", "rfid"))
except ImportError as exc:
    recon = f"recon skipped: {exc}"
print(recon)
print(f"eval on {torch.cuda.get_device_name(0)}: {'OK' if ok else 'FAIL'}; extract {ips:.0f} img/s; "
      f"bf16 pooled rel. err {r16:.1e}; {recon.split(':')[0]}")
raise SystemExit(0 if ok else 1)
EOF
