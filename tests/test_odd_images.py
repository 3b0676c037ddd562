"""Odd images through `stellar data check` and every decoder (issue: real folders crash the loaders).

The corpus (`tests/odd_images.py`) is made here. Everything that runs a native decoder runs in a
subprocess -- the CLI, the decoders, the check's own worker processes -- so a crash fails a test
instead of the test runner. Pure-Python parts (the screen, the EXIF parser, `to_rgb8`,
`apply_orientation`) run in this process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stellar.data import check, decode

sys.path.insert(0, str(Path(__file__).parent))
import odd_images  # noqa: E402

HERE = Path(__file__).parent
REPO = HERE.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    cases = odd_images.make_corpus(root)
    return root, {c.name: c for c in cases}


def _good(cases):
    return sorted(n for n, c in cases.items() if c.expect is not None)


def _bad(root, cases):
    return sorted(str((root / n).resolve()) for n, c in cases.items() if c.expect is None)


def _run(args, timeout=300):
    """A subprocess; its crash (a negative return code) fails the test with the signal named."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{args[:3]} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _decoded(modes, root, names, dest):
    """{mode: {name: pixels, or the decoder's message when it refused the file (GPU modes)}} from
    one subprocess running every decoder of `modes` in turn."""
    _run([str(HERE / "odd_images.py"), ",".join(modes), str(root), str(dest), *names])
    with np.load(dest) as z:
        out = {m: {} for m in modes}
        for m in modes:  # a file a decoder does not take at all (DALI: GIF) is absent
            for n in names:
                if f"{m}/{n}" in z:
                    out[m][n] = z[f"{m}/{n}"]
                elif f"{m}/error:{n}" in z:
                    out[m][n] = str(z[f"{m}/error:{n}"])
        return out


HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


@pytest.fixture(scope="module")
def cpu_decoded(corpus, tmp_path_factory):
    """{mode: {name: pixels}} of every CPU decoder (DALI's too, where installed) from ONE
    subprocess (each costs a torch import): the corpus's good files by their corpus names, and
    the real corpus's 8-bit JPEG, PNG and WebP files (what the dali backend hands DALI) by
    their paths."""
    root, cases = corpus
    real = [p for p in _real_corpus_files() if Path(p).suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
            and decode.screen_file(p) is None and decode.probe_bytes(Path(p).read_bytes()).bit_depth <= 8]
    names = [str((root / n).resolve())[1:] for n in _good(cases)] + [str(Path(p).resolve())[1:] for p in real]
    modes = ["reference", "torchvision"] + (["dali", "dali16"] if HAVE_DALI else [])
    got = _decoded(modes, Path("/"), names, tmp_path_factory.mktemp("dec") / "cpu.npz")
    corpus_names = {str((root / n).resolve())[1:]: n for n in _good(cases)}
    return {m: {corpus_names.get(k, "/" + k): v for k, v in d.items()} for m, d in got.items()}


def _fuzz_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(list(_mutations(1, 90)) + list(_png_mutations(2, 60))):
        paths.append(str(folder / f"m{i:03d}.img"))
        Path(paths[-1]).write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory):
    return _fuzz_files(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def unscreened(corpus, fuzz_files):
    """{path: verdict} of Pillow then torchvision on the raw bytes (no screen), in the check's
    worker processes, for the corpus's good files, the fuzzed files the screen lets through, and
    the real corpus (when installed): one run, since each worker pays for importing torch (and a
    crash for a new worker; the files the screen refuses would crash a few)."""
    root, cases = corpus
    passed = [p for p in fuzz_files if decode.screen_file(p) is None]
    paths = [str(root / n) for n in _good(cases)] + passed + _real_corpus_files()
    # Pillow first: it refuses most damaged files without crashing, so few workers die (each new
    # one imports torch again); torchvision then decodes what Pillow accepted
    return check.check_paths(paths, full=True, screen=False, decoders=("reference", "torchvision"), num_workers=2)


def _assert_reasons(reasons: dict, root, cases):
    """Every bad file named, with a reason about what is wrong with it; no good file named."""
    assert sorted(reasons) == _bad(root, cases)
    for path, reason in reasons.items():
        want = cases[Path(path).name].why
        assert want in reason.lower(), (Path(path).name, reason, want)


# ----------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------
def test_cli_check_names_every_bad_file_and_never_crashes(corpus):
    root, cases = corpus
    proc = _run(["-m", "stellar.cli", "data", "check", str(root), "--workers", "2"])
    n_bad = sum(c.expect is None for c in cases.values())
    assert f"{len(cases)} images, {n_bad} bad" in proc.stdout and "files/s" in proc.stdout
    for name in (n for n, c in cases.items() if c.expect is None):
        assert name in proc.stdout
    _assert_reasons(check.read_bad_reasons(root / check.BAD_LIST_NAME), root, cases)
    assert check.read_bad_list(root / check.BAD_LIST_NAME) == set(_bad(root, cases))


def test_screen_in_worker_processes_gives_the_same_reasons(corpus, tmp_path, monkeypatch):
    root, cases = corpus
    monkeypatch.setattr(check, "PROCESS_SCREEN_MIN", 1)  # big folders screen in the workers
    stats = {}
    found = check.check_paths(check.find_images(root), num_workers=2, stats=stats)
    unverified = ["gif_palette.gif", "gif_truncated.gif", "webp_lossless.webp", "webp_orientation_8.webp",
                  "bmp_rgb.bmp", "bmp_truncated.bmp", "tiff_rgb.tiff"]  # only a decode judges these
    assert stats["screen_in_processes"] and stats["decoded"] == len(unverified)
    _assert_reasons({str(Path(p).resolve()): r for p, r in found.items() if r is not None}, root, cases)


def test_full_check_decodes_every_file_and_names_the_same_bad_ones(corpus, tmp_path):
    root, cases = corpus
    result = check.check_images(root, out=tmp_path / "bad.txt", full=True, num_workers=2)
    assert result["total"] == len(cases) and result["decoded"] == len(cases)
    _assert_reasons(result["reasons"], root, cases)


def test_unscreened_png_crashes_torchvision_in_a_worker_and_the_check_goes_on(corpus):
    """The bug of the issue, kept: libpng's "bad adaptive filter value" kills the decoding
    process. Without the screen it reaches torchvision -- in a worker, which dies alone."""
    root, _ = corpus
    paths = [str(root / n) for n in ("png_rgb.png", "png_bad_filter.png", "jpeg_444.jpg", "png_gray16.png")]
    found = check.check_paths(paths, full=True, screen=False, decoders=("torchvision",), num_workers=1)
    assert found[paths[1]].startswith("decoder crashed (SIGSEGV)"), found[paths[1]]
    assert "bad adaptive filter value" in found[paths[1]]
    assert [found[p] for p in paths if p != paths[1]] == [None, None, None]  # the files after it were checked


def test_a_stuck_worker_times_out_and_is_replaced(tmp_path, monkeypatch):
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4)).save(files[-1])
    monkeypatch.setattr(check, "_WORKER_BOOT", "import time; time.sleep(60)")  # a decoder that never returns
    found = check.check_paths(files, full=True, num_workers=1, timeout=0.3)  # the worker sleeps 60 s
    assert all(r.startswith("decoder timed out") for r in found.values()), found


def test_check_skips_what_is_not_a_regular_file(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it would block the check forever
    result = check.check_images(tmp_path, num_workers=1)
    assert result["bad"] == [str((tmp_path / "fifo.jpg").resolve())]
    assert "not a regular file" in result["reasons"][result["bad"][0]]


# ----------------------------------------------------------------------------------------------
# the decoders, each in a subprocess
# ----------------------------------------------------------------------------------------------
def test_reference_decode_gives_the_expected_pixels(corpus, cpu_decoded):
    _, cases = corpus
    got = cpu_decoded["reference"]
    for n in _good(cases):
        want = cases[n].expect
        assert got[n].dtype == np.uint8 and got[n].shape == want.shape, (n, got[n].shape, want.shape)
        diff = np.abs(got[n].astype(int) - want).max()
        assert diff <= cases[n].tol, (n, diff)


def test_torchvision_decode_matches_the_reference(corpus, cpu_decoded):
    ref, got = cpu_decoded["reference"], cpu_decoded["torchvision"]
    for n in ref:  # the corpus and the real corpus's 8-bit JPEG/PNG/WebP
        assert got[n].shape == ref[n].shape, n
        diff = np.abs(got[n].astype(int) - ref[n]).max()
        # both run libjpeg-turbo; CMYK/YCCK -> RGB rounds differently (measured: 1 level)
        tol = 1 if Path(n).name.startswith(("jpeg_cmyk", "jpeg_ycck")) else 0
        assert diff <= tol, (n, diff)


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")
def test_dali_cpu_decode_matches_the_reference(cpu_decoded):
    """DALI with adjust_orientation=False, then to_rgb8 + our orientation: the corpus (but GIF:
    DALI has none) and the real corpus's 8-bit JPEG/PNG/WebP files. With dtype=UINT8 DALI
    rounds 16-bit samples as v / 257 (up to 1 level from the reference's v >> 8); with UINT16
    and to_rgb8 it matches exactly."""
    ref = cpu_decoded["reference"]
    names = [n for n in ref if not n.endswith(".gif")]
    assert sum(n.endswith("16.png") or "16_" in n for n in names) >= 3
    for mode in ("dali", "dali16"):
        for n in names:
            got = cpu_decoded[mode][n]
            assert got.shape == ref[n].shape, (mode, n)
            diff = np.abs(got.astype(int) - ref[n]).max()
            base = Path(n).name
            tol = 1 if base.startswith(("jpeg_cmyk", "jpeg_ycck")) or (mode == "dali" and base.startswith("png_") and "16" in base) else 0
            assert diff <= tol, (mode, n, diff)


# ----------------------------------------------------------------------------------------------
# pure Python: the screen, EXIF, to_rgb8, apply_orientation
# ----------------------------------------------------------------------------------------------
def test_screen_passes_the_good_and_names_the_bad(corpus):
    root, cases = corpus
    for n, c in cases.items():
        reason = decode.screen_file(root / n)
        if c.expect is not None or n in ("bmp_truncated.bmp", "gif_truncated.gif"):  # only a decode judges these
            assert reason is None, (n, reason)
        else:
            assert reason is not None and c.why in reason.lower(), (n, reason)


def test_probe_describes_the_container(corpus):
    root, _ = corpus
    info = decode.probe_bytes((root / "png_rgba16_interlaced.png").read_bytes())
    assert (info.format, info.channels, info.bit_depth, info.verified) == ("png", 4, 16, True)
    assert "interlaced" in info.notes
    info = decode.probe_bytes((root / "jpeg_ycck.jpg").read_bytes())
    assert (info.format, info.channels, info.width, info.height) == ("jpeg", 4, 40, 24) and "ycck" in info.notes
    assert "cmyk" in decode.probe_bytes((root / "jpeg_cmyk.jpg").read_bytes()).notes
    assert "qtable16" in decode.probe_bytes((root / "jpeg_qtable16.jpg").read_bytes()).notes
    assert "progressive" in decode.probe_bytes((root / "jpeg_progressive.jpg").read_bytes()).notes
    assert decode.probe_bytes((root / "webp_lossless.webp").read_bytes()).verified is False
    with pytest.raises(decode.DecodeError, match="png_bad_filter.png: PNG row 5 has an invalid filter type 7"):
        decode.probe_bytes((root / "png_bad_filter.png").read_bytes(), "png_bad_filter.png")


def test_read_orientation_of_every_file(corpus):
    root, cases = corpus
    for n, c in cases.items():
        if c.expect is not None:
            assert decode.read_orientation((root / n).read_bytes()) == c.orientation, n
    assert decode.read_orientation(b"") == 1 and decode.read_orientation(b"\xff\xd8\xff") == 1


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_is_pillows_transpose(gen, layout, orientation):
    stored = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=gen)  # H != W: transposes show
    want = torch.from_numpy(odd_images.upright(stored.numpy(), orientation).copy())
    img = stored.permute(2, 0, 1) if layout == "CHW" else stored
    got = decode.apply_orientation(img, orientation, layout=layout)
    got = got.permute(1, 2, 0) if layout == "CHW" else got
    assert torch.equal(got, want)


def test_apply_orientation_rejects_bad_arguments():
    img = torch.zeros(3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="orientation"):
        decode.apply_orientation(img, 9)
    with pytest.raises(ValueError, match="layout"):
        decode.apply_orientation(img, 1, layout="NCHW")


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16])
def test_to_rgb8_matches_the_reference_rules(gen, layout, channels, dtype):
    high = 256 if dtype == torch.uint8 else 65536
    hwc = torch.randint(0, high, (6, 5, channels), dtype=torch.int64, generator=gen)
    hwc[0, 0] = high - 1  # the top of the range: uint16 65535 must not turn negative
    if dtype == torch.uint16:
        want = hwc >> 8
    else:
        want = hwc
    want = want[..., :1].expand(6, 5, 3) if channels <= 2 else want[..., :3]
    img = hwc.to(dtype) if dtype == torch.uint8 else hwc.to(torch.int32).to(torch.uint16)
    img = img.permute(2, 0, 1) if layout == "CHW" else img
    got = decode.to_rgb8(img, layout=layout)
    got = got.permute(1, 2, 0) if layout == "CHW" else got
    assert got.dtype == torch.uint8 and torch.equal(got.long(), want)


def test_to_rgb8_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="channels"):
        decode.to_rgb8(torch.zeros(5, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        decode.to_rgb8(torch.zeros(3, 2, 2, dtype=torch.float32))


def _mutations(seed: int, n: int):
    """Damaged variants of valid files: flipped bytes, cuts, inserted and repeated runs."""
    rng = np.random.default_rng(seed)
    src = odd_images.pattern(9, 14)
    bases = [odd_images.png_bytes(src, 2, 8, filters=(0, 1, 4)), odd_images.png_bytes(src, 2, 8, interlace=True),
             odd_images._jpeg(src, quality=90), odd_images._jpeg(src, quality=90, progressive=True),
             odd_images._save(Image.fromarray(src), "GIF"), odd_images._save(Image.fromarray(src), "WEBP", lossless=True)]
    for i in range(n):
        data = bytearray(bases[i % len(bases)])
        for _ in range(int(rng.integers(1, 4))):
            if len(data) < 2:
                break
            kind, at = rng.integers(0, 4), int(rng.integers(0, len(data)))
            if kind == 0:
                data[at] = int(rng.integers(0, 256))
            elif kind == 1:
                del data[at:]
            elif kind == 2:
                data[at:at] = rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8).tobytes()
            elif len(data) > 1:
                data[at:at] = data[at : at + int(rng.integers(1, 40))]
        yield bytes(data)


def test_screen_only_ever_raises_decode_error_on_damaged_bytes():
    for data in _mutations(0, 600):
        try:
            decode.probe_bytes(data)
        except decode.DecodeError:
            pass


def _png_mutations(seed: int, n: int):
    """PNGs whose CRCs and zlib stream are valid but whose content is not: random header fields,
    filter bytes, data lengths -- what only the screen's inner checks can refuse."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        color = int(rng.choice([0, 2, 3, 4, 6, 1, 5]))
        depth = int(rng.choice([1, 2, 4, 8, 16, 3]))
        w, h, interlace = int(rng.integers(1, 12)), int(rng.integers(1, 12)), int(rng.integers(0, 2))
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, 3)
        row = 1 + (w * channels * max(depth, 1) + 7) // 8
        raw = bytearray(rng.integers(0, 256, h * row * (2 if interlace else 1), dtype=np.uint8).tobytes())
        for k in range(0, len(raw), row):
            raw[k] = int(rng.integers(0, 5)) if rng.random() < 0.9 else int(rng.integers(5, 256))
        raw = raw[: int(len(raw) * rng.choice([1.0, 1.0, 0.7, 1.3]))]
        out = b"\x89PNG\r\n\x1a\n" + odd_images.png_chunk(b"IHDR", np.array([w, h], ">u4").tobytes() + bytes([depth, color, 0, 0, interlace]))
        if color == 3 and rng.random() < 0.8:
            out += odd_images.png_chunk(b"PLTE", rng.integers(0, 256, 3 * int(rng.integers(1, 257)), dtype=np.uint8).tobytes())
        if rng.random() < 0.3:
            out += odd_images.png_chunk(b"tRNS", rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        out += odd_images.png_chunk(b"IDAT", zlib.compress(bytes(raw)))
        yield out + odd_images.png_chunk(b"IEND", b"")


def test_what_passes_the_screen_never_crashes_a_decoder(fuzz_files, unscreened):
    """Damaged and malformed files (Pillow and torchvision on the raw bytes, in worker processes):
    every file the screen vouches for decodes with both -- no error, no crash. (Without the
    screen, some of the refused ones kill torchvision's process: see the crash test.)"""
    passed = [p for p in fuzz_files if decode.screen_file(p) is None]
    assert 10 < len(passed) < len(fuzz_files) - 10  # the mutations test both sides
    verified = [p for p in passed if decode.probe_bytes(Path(p).read_bytes()).verified]
    assert len(verified) > 10
    failures = {p: unscreened[p] for p in verified if unscreened[p] is not None}
    assert not failures, failures


# ----------------------------------------------------------------------------------------------
# on a GPU (`make gpu` runs the tests named "cuda")
# ----------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_cuda_to_rgb8_and_apply_orientation_match_the_cpu_without_a_sync(gen, layout):
    for dtype, high in ((torch.uint8, 256), (torch.uint16, 65536)):
        for channels in (1, 2, 3, 4):
            hwc = torch.randint(0, high, (5, 7, channels), generator=gen).to(torch.int32)
            cpu = hwc.to(dtype) if dtype == torch.uint8 else hwc.to(torch.uint16)
            cpu = cpu.permute(2, 0, 1) if layout == "CHW" else cpu
            want = [decode.apply_orientation(decode.to_rgb8(cpu, layout), k, layout) for k in range(1, 9)]
            gpu = cpu.cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # a host sync in either function raises
            try:
                got = [decode.apply_orientation(decode.to_rgb8(gpu, layout), k, layout) for k in range(1, 9)]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            for k in range(8):
                assert got[k].is_cuda and torch.equal(got[k].cpu(), want[k]), (dtype, channels, k + 1)


@cuda_only
def test_cuda_decoders_match_the_reference_on_odd_jpegs(corpus, tmp_path):
    """nvJPEG (torchvision) and DALI "mixed", each file alone, then to_rgb8 + our orientation:
    every JPEG the device backends hand them (8-bit, 1 or 3 components) decodes, upright, within
    JPEG tolerance of the source pixels; the CMYK/YCCK ones (kept on the CPU by the backends)
    only must not take the process down."""
    root, cases = corpus
    names = [n for n in _good(cases) if decode.probe_bytes((root / n).read_bytes()).format == "jpeg"]
    modes = ["nvjpeg"] + (["dali_mixed"] if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali") else [])
    got = _decoded(modes, root, names, tmp_path / "gpu.npz")
    for mode in modes:
        for n in names:
            info = decode.probe_bytes((root / n).read_bytes())
            if {"cmyk", "ycck"} & set(info.notes):
                continue
            out = got[mode][n]
            assert not isinstance(out, str), (mode, n, out)
            want = cases[n].expect
            assert out.shape == want.shape, (mode, n, out.shape, want.shape)
            # GPU IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels; a wrong
            # flip or transpose of this pattern is off by ~100
            diff = np.abs(out.astype(int) - want).max()
            assert diff <= cases[n].tol + 8, (mode, n, diff)


# ----------------------------------------------------------------------------------------------
# a real corpus nobody here made (Debian packages; see tests/get_real_corpus.sh)
# ----------------------------------------------------------------------------------------------
REAL_CORPUS = [REPO / ".cache" / "real_corpus", Path("/usr/share/gocode/src")]
GOEXIF = "github.com/rwcarlsen/goexif/exif"
XIMAGE = "golang.org/x/image/testdata"


def _real_corpus():
    for base in REAL_CORPUS:
        if (base / GOEXIF).is_dir() and (base / XIMAGE).is_dir():
            return base
    return None


def _real_corpus_files() -> list[str]:
    base = _real_corpus()
    return [] if base is None else [str(p) for d in (GOEXIF, XIMAGE) for p in check.find_images(base / d)]


@pytest.mark.skipif(_real_corpus() is None, reason="real corpus not installed: run `bash tests/get_real_corpus.sh`")
def test_real_corpus_screen_and_decoders_agree(unscreened, cpu_decoded):
    """The check (screen, and the reference decode for the formats it does not vouch for) and
    Pillow + torchvision on the raw bytes call the same files bad."""
    base = _real_corpus()
    paths = _real_corpus_files()
    assert len(paths) > 100
    screened = check.check_paths(paths, num_workers=2)
    raw = {p: unscreened[p] for p in paths}
    disagree = {Path(p).name: (screened[p], raw[p]) for p in paths if (screened[p] is None) != (raw[p] is None)}
    assert not disagree, disagree
    assert sum(r is None for r in screened.values()) > 60
    # f1..f8-exif.jpg: one upright "F" stored in each EXIF orientation: decoded, all equal
    fs = [base / GOEXIF / "samples" / f"f{k}-exif.jpg" for k in range(1, 9)]
    assert [decode.read_orientation(f.read_bytes()) for f in fs] == list(range(1, 9))
    imgs = [cpu_decoded["reference"][str(f.resolve())].astype(int) for f in fs]
    assert all(img.shape == imgs[0].shape for img in imgs)
    # the eight files hold the same pixels up to a lossless transpose (measured: identical)
    assert max(np.abs(img - imgs[0]).max() for img in imgs) <= 2
