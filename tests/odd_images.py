"""A corpus of odd images that the tests make themselves (Pillow, numpy, raw bytes; nothing downloaded).

`make_corpus(root)` writes every kind of file a scraped folder holds and returns one `Odd` per
file: what a decoder must give for it (the upright 8-bit RGB pixels, within `tol` levels: JPEG is
lossy), or None with a fragment of the reason for a file that no decoder takes.

The pixel content is a smooth, asymmetric pattern (red grows along x, green along y): JPEG keeps
it within a few levels, and any wrong flip or transpose moves it by far more than that.

Run as a script (`python tests/odd_images.py MODE[,MODE...] ROOT OUT.npz NAME...`), it decodes
the files named with each decoder and saves the pixels ("MODE/NAME" keys): the tests run that in
a subprocess, so a decoder that crashes fails the test instead of the test runner.
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Odd:
    name: str  # path relative to the corpus root
    expect: np.ndarray | None  # uint8 [H, W, 3], upright; None: a bad file
    tol: int = 0  # largest |difference| allowed against `expect`
    why: str = ""  # bad files: a fragment of the reason (lower case)
    orientation: int = 1  # the EXIF orientation written into the file


def pattern(h: int, w: int, channels: int = 3) -> np.ndarray:
    """uint8 [h, w, channels]: smooth and asymmetric (see the module docstring)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 30 + 190 * x / max(w - 1, 1)
    g = 20 + 200 * y / max(h - 1, 1)
    b = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)
    a = 255 - 150 * (x + y) / max(w + h - 2, 1)
    planes = [r, g, b, a][:channels]
    return np.clip(np.round(np.stack(planes, -1)), 0, 255).astype(np.uint8)


def pattern16(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """uint16 [h, w, channels] over the full range, with low bytes that matter for rounding."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65536, (h, w, channels), dtype=np.uint16)


# ----------------------------------------------------------------------------------------------
# raw PNG writer (Pillow writes no interlaced, 16-bit colour or chosen-filter PNGs)
# ----------------------------------------------------------------------------------------------
def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def _filter_rows(rows: np.ndarray, bpp: int, filters) -> bytes:
    """rows: uint8 [h, rowbytes]; PNG filter type filters[i] applied to row i (encoder side)."""
    out = []
    prev = np.zeros(rows.shape[1], np.int32)
    for i, row in enumerate(rows.astype(np.int32)):
        f = filters[i % len(filters)]
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if f == 0:
            pred = np.zeros_like(row)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = prev
        elif f == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        out.append(bytes([f]) + ((row - pred) & 0xFF).astype(np.uint8).tobytes())
        prev = row
    return b"".join(out)


def _pack(samples: np.ndarray, depth: int) -> np.ndarray:
    """[h, w, c] samples -> [h, rowbytes] bytes of one PNG scanline each (big-endian, bit-packed)."""
    h, w, c = samples.shape
    if depth == 16:
        return samples.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    if depth == 8:
        return samples.astype(np.uint8).reshape(h, w * c)
    bits = np.unpackbits(samples.astype(np.uint8).reshape(h, w * c, 1), axis=2)[:, :, 8 - depth :]
    return np.packbits(bits.reshape(h, -1), axis=1)


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_bytes(samples: np.ndarray, color: int, depth: int, interlace: bool = False, filters=(0,), plte: bytes | None = None,
              extra_before: bytes = b"", raw_override: bytes | None = None) -> bytes:
    """A PNG of `samples` ([h, w, c] in the sample range of `depth`) written by hand.

    filters: filter types cycled over the rows; raw_override: the inflated stream to store
    instead (to corrupt it); extra_before: chunks placed before IDAT.
    """
    h, w, c = samples.shape
    bpp = max(1, c * depth // 8)
    if raw_override is not None:
        raw = raw_override
    elif not interlace:
        raw = _filter_rows(_pack(samples, depth), bpp, filters)
    else:
        raw = b""
        for x0, y0, dx, dy in _ADAM7:
            sub = samples[y0::dy, x0::dx]
            if sub.shape[0] and sub.shape[1]:
                raw += _filter_rows(_pack(sub, depth), bpp, filters)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, int(interlace)))
    if plte is not None:
        out += png_chunk(b"PLTE", plte)
    out += extra_before + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    return out


def png_rows_raw(samples: np.ndarray, depth: int, filters=(0,)) -> bytes:
    h, w, c = samples.shape
    return _filter_rows(_pack(samples, depth), max(1, c * depth // 8), filters)


# ----------------------------------------------------------------------------------------------
# EXIF
# ----------------------------------------------------------------------------------------------
def exif_block(orientation: int, big_endian: bool = False, typ: int = 3) -> bytes:
    """A TIFF structure (what follows "Exif\\0\\0") whose IFD0 holds the orientation tag."""
    e = ">" if big_endian else "<"
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8)
    value = struct.pack(e + "H", orientation) + b"\0\0" if typ == 3 else struct.pack(e + "I", orientation)
    ifd = struct.pack(e + "H", 2)
    ifd += struct.pack(e + "HHI", 0x010F, 2, 4) + b"cam\0"  # Make = "cam"
    ifd += struct.pack(e + "HHI", 0x0112, typ, 1) + value
    return head + ifd + struct.pack(e + "I", 0)


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """A JPEG with an APP1 segment holding `payload` right after its start-of-image marker."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


_PIL_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                  5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}


def upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for pixels stored with this EXIF orientation (Pillow's transposes)."""
    if orientation == 1:
        return stored
    return np.asarray(Image.fromarray(stored).transpose(_PIL_TRANSPOSE[orientation]))


# ----------------------------------------------------------------------------------------------
# the corpus
# ----------------------------------------------------------------------------------------------
def _jpeg(arr: np.ndarray, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "JPEG", **kw) if mode else Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF RGB -> YCbCr (what libjpeg's YCCK decode inverts)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.round(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)


def make_corpus(root) -> list[Odd]:
    """Write the corpus under `root` (flat, one file per case) and return its cases."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Odd] = []

    def put(name, data: bytes, expect=None, tol=0, why="", orientation=1):
        (root / name).write_bytes(data)
        cases.append(Odd(name, expect, tol, why, orientation))

    h, w = 24, 40
    src = pattern(h, w)
    # q95 keeps this smooth pattern within ~5 levels (~10 with 4:2:0 chroma); a wrong flip or
    # transpose moves it by ~100
    jpeg_tol, sub_tol = 8, 16

    # --- JPEG: decodable ---------------------------------------------------------------------
    put("jpeg_444.jpg", _jpeg(src, quality=95, subsampling=0), src, jpeg_tol)
    put("jpeg_420.jpg", _jpeg(src, quality=95, subsampling=2), src, sub_tol)
    put("jpeg_progressive.jpg", _jpeg(src, quality=95, progressive=True), src, sub_tol)
    big = pattern(64, 96)
    put("jpeg_restart.jpg", _jpeg(big, quality=95, subsampling=0, restart_marker_blocks=3), big, jpeg_tol)
    q16 = [[2] * 63 + [300], [2] * 63 + [300]]  # a value over 255 makes Pillow write 16-bit tables
    put("jpeg_qtable16.jpg", _jpeg(src, qtables=q16, subsampling=0), src, jpeg_tol)
    put("jpeg_trailing_zeros.jpg", _jpeg(src, quality=95, subsampling=0) + b"\0" * 3000, src, jpeg_tol)
    gray = src[..., 1]
    put("jpeg_gray.jpg", _jpeg(gray, quality=95), np.repeat(gray[..., None], 3, 2), jpeg_tol)
    # CMYK (Adobe, inverted as Pillow and Photoshop write it): ink K = 0, C = 255 - R ... -> RGB = src
    cmyk = np.concatenate([255 - src, np.zeros((h, w, 1), np.uint8)], -1)
    put("jpeg_cmyk.jpg", _jpeg(cmyk, "CMYK", quality=95), src, jpeg_tol)
    # YCCK: Pillow writes Adobe CMYK (transform 0); store YCbCr of (255 - src) and K = 255 in the
    # four components and mark the transform 2: libjpeg then turns YCC back into 255 - C ... and
    # the CMYK -> RGB of every decoder gives src.
    stored = np.concatenate([_ycbcr(255 - src), np.full((h, w, 1), 255, np.uint8)], -1)
    data = bytearray(_jpeg(255 - stored, "CMYK", quality=95))  # Pillow inverts CMYK when writing
    at = data.find(b"Adobe")
    assert at > 0 and data[at + 11] == 0, "expected Pillow's Adobe marker with transform 0"
    data[at + 11] = 2
    put("jpeg_ycck.jpg", bytes(data), src, jpeg_tol)
    plain = _jpeg(src, quality=95, subsampling=0)
    for k in range(1, 9):  # EXIF orientation, as a camera writes it: stored pixels + the tag
        stored_px = upright(src, {5: 5, 6: 8, 7: 7, 8: 6}.get(k, k))  # the inverse transform of k
        exif = Image.Exif()
        exif[0x0112] = k
        put(f"jpeg_orientation_{k}.jpg", _jpeg(stored_px, quality=95, subsampling=0, exif=exif.tobytes()), src, jpeg_tol, orientation=k)
    put("jpeg_exif_bigendian_6.jpg", with_app1(_jpeg(upright(src, 8), quality=95, subsampling=0), b"Exif\0\0" + exif_block(6, True)),
        src, jpeg_tol, orientation=6)
    put("jpeg_exif_long_3.jpg", with_app1(_jpeg(upright(src, 3), quality=95, subsampling=0), b"Exif\0\0" + exif_block(3, typ=4)),
        src, jpeg_tol, orientation=3)
    put("jpeg_exif_value_9.jpg", with_app1(plain, b"Exif\0\0" + exif_block(9)), src, jpeg_tol)  # out of range: as is
    put("jpeg_exif_garbage.jpg", with_app1(plain, b"Exif\0\0" + b"II*\0" + b"\xff" * 40), src, jpeg_tol)  # broken EXIF: as is
    put("jpeg_exif_cut.jpg", with_app1(plain, b"Exif\0\0" + exif_block(6)[:14]), src, jpeg_tol)  # IFD cut short: as is
    comment = plain[:2] + b"\xff\xfe" + struct.pack(">H", 12) + b"a comment!" + plain[2:]
    put("jpeg_comment.jpg", comment, src, jpeg_tol)
    put("jpeg_named.png", plain, src, jpeg_tol)  # a JPEG with a .png name: decoders go by content

    # --- PNG: decodable ----------------------------------------------------------------------
    put("png_rgb.png", _save(Image.fromarray(src), "PNG"), src)
    put("png_gray.png", _save(Image.fromarray(gray), "PNG"), np.repeat(gray[..., None], 3, 2))
    bilevel = (src[..., 0] > 120)
    put("png_bilevel.png", _save(Image.fromarray(bilevel), "PNG"), np.repeat((bilevel * 255).astype(np.uint8)[..., None], 3, 2))
    rgba = pattern(h, w, 4)
    put("png_rgba.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), rgba[..., :3])
    la = np.stack([gray, rgba[..., 3]], -1)
    put("png_la.png", _save(Image.fromarray(la, "LA"), "PNG"), np.repeat(gray[..., None], 3, 2))
    pal = Image.fromarray(src).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal_rgb = np.asarray(pal.convert("RGB"))
    put("png_palette.png", _save(pal, "PNG"), pal_rgb)
    put("png_palette_trns.png", _save(pal, "PNG", transparency=bytes([0, 128] + [255] * 30)), pal_rgb)
    g16 = pattern16(h, w, 1, 1)
    put("png_gray16.png", png_bytes(g16, 0, 16), np.repeat((g16 >> 8).astype(np.uint8), 3, 2))
    rgb16 = pattern16(h, w, 3, 2)
    put("png_rgb16.png", png_bytes(rgb16, 2, 16, filters=(0, 1, 2, 3, 4)), (rgb16 >> 8).astype(np.uint8))
    la16 = pattern16(h, w, 2, 3)
    put("png_la16.png", png_bytes(la16, 4, 16), np.repeat((la16[..., :1] >> 8).astype(np.uint8), 3, 2))
    rgba16 = pattern16(h, w, 4, 4)
    put("png_rgba16_interlaced.png", png_bytes(rgba16, 6, 16, interlace=True, filters=(4, 3, 2, 1, 0)), (rgba16[..., :3] >> 8).astype(np.uint8))
    put("png_rgb_filters.png", png_bytes(src, 2, 8, filters=(0, 1, 2, 3, 4)), src)
    odd = pattern(13, 11)
    put("png_rgb_interlaced.png", png_bytes(odd, 2, 8, interlace=True, filters=(1, 4, 0, 2, 3)), odd)
    g2 = (pattern(7, 5)[..., :1] >> 6).astype(np.uint8)  # 2-bit gray, odd width, interlaced
    put("png_gray2_interlaced.png", png_bytes(g2, 0, 2, interlace=True), np.repeat((g2 * 85).astype(np.uint8), 3, 2))
    put("png_1x1.png", png_bytes(src[:1, :1], 2, 8), src[:1, :1])
    exif = Image.Exif()
    exif[0x0112] = 6
    put("png_orientation_6.png", _save(Image.fromarray(upright(src, 8)), "PNG", exif=exif.tobytes()), src, orientation=6)

    # --- other formats: decodable (the check decodes these with the reference) ----------------
    put("gif_palette.gif", _save(pal, "GIF"), pal_rgb)
    put("webp_lossless.webp", _save(Image.fromarray(src), "WEBP", lossless=True), src)
    exif[0x0112] = 8
    put("webp_orientation_8.webp", _save(Image.fromarray(upright(src, 6)), "WEBP", lossless=True, exif=exif.tobytes()), src, orientation=8)
    put("bmp_rgb.bmp", _save(Image.fromarray(src), "BMP"), src)
    put("tiff_rgb.tiff", _save(Image.fromarray(src), "TIFF"), src)
    put("ppm_rgb.ppm", _save(Image.fromarray(src), "PPM"), src)

    # --- bad files -------------------------------------------------------------------------------
    rng = np.random.default_rng(7)
    put("empty.jpg", b"", why="empty")
    put("page.jpg", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n", why="html")
    put("notes.png", b"just some text that someone saved with the wrong name\n" * 3, why="text")
    put("random.jpg", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), why="not an image")
    put("random_after_magic.png", b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), why="png")
    put("junk_before.jpg", b"HTTP/1.1 200 OK\r\n\r\n" + plain, why="junk")
    for k, cut in enumerate((20, len(plain) // 2, len(plain) - 2)):  # in the header, in the scan, only the end marker
        put(f"jpeg_truncated_{k}.jpg", plain[:cut], why="truncated")
    prog = _jpeg(src, quality=95, progressive=True)
    put("jpeg_progressive_truncated.jpg", prog[: len(prog) * 2 // 3], why="truncated")
    sof = plain.find(b"\xff\xc0")
    huge = bytearray(plain)
    huge[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    put("jpeg_huge_header.jpg", bytes(huge), why="pixels")
    deep = bytearray(plain)
    deep[sof + 4] = 12
    put("jpeg_12bit.jpg", bytes(deep), why="12-bit")
    png_ok = png_bytes(src, 2, 8)
    for k, cut in enumerate((30, len(png_ok) // 2, len(png_ok) - 12)):  # in IHDR, in IDAT, only IEND missing
        put(f"png_truncated_{k}.png", png_ok[:cut], why="truncated")
    filters = [0] * h
    filters[5] = 7  # libpng: "bad adaptive filter value" -- segfaults torchvision
    raw = bytearray(png_rows_raw(src, 8))
    raw[5 * (3 * w + 1)] = 7
    put("png_bad_filter.png", png_bytes(src, 2, 8, raw_override=bytes(raw)), why="filter")
    crc = bytearray(png_ok)
    crc[png_ok.find(b"IDAT") + 10] ^= 0x55
    put("png_bad_crc.png", bytes(crc), why="crc")
    stream = bytearray(zlib.compress(png_rows_raw(src, 8)))
    stream[-2] ^= 0xFF  # the Adler-32 of the zlib stream
    ihdr_end = 8 + 25
    bad_zlib = png_ok[:ihdr_end] + png_chunk(b"IDAT", bytes(stream)) + png_chunk(b"IEND", b"")
    put("png_bad_adler.png", bad_zlib, why="zlib")
    put("png_short_data.png", png_bytes(src, 2, 8, raw_override=png_rows_raw(src[: h // 2], 8)), why="image data")
    put("png_palette_without_plte.png", png_bytes(src[..., :1] // 16, 3, 8), why="plte")
    put("png_unknown_critical.png", png_bytes(src, 2, 8, extra_before=png_chunk(b"ABCD", b"x")), why="critical")
    put("png_huge_header.png", png_bytes(np.zeros((1, 1, 3), np.uint8), 2, 8)[:16] + struct.pack(">II", 200_000, 200_000)
        + png_bytes(np.zeros((1, 1, 3), np.uint8), 2, 8)[24:], why="crc")  # the CRC no longer fits
    hdr = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)
    put("png_huge_dimensions.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", hdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + png_chunk(b"IEND", b""), why="pixels")
    hdr = struct.pack(">IIBBBBB", 2_000_000, 1, 8, 0, 0, 0, 0)
    put("png_too_wide.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", hdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + png_chunk(b"IEND", b""), why="side limit")
    gif = _save(pal, "GIF")
    put("gif_truncated.gif", gif[: len(gif) // 2], why="truncated")
    webp = _save(Image.fromarray(src), "WEBP", lossless=True)
    put("webp_truncated.webp", webp[: len(webp) // 2], why="truncated")
    bmp = _save(Image.fromarray(src), "BMP")
    put("bmp_truncated.bmp", bmp[: len(bmp) // 2], why="truncated")
    return cases


# ----------------------------------------------------------------------------------------------
# decoding in a subprocess: `python tests/odd_images.py MODE[,MODE...] ROOT OUT.npz NAME...`
# ----------------------------------------------------------------------------------------------
def _decode_all(mode: str, root: Path, names: list[str]) -> dict[str, np.ndarray]:
    """{name: uint8 [H, W, 3]} of the files `names` under `root`, decoded by `mode`: "reference",
    "torchvision" (`decode_bytes_torchvision`), "dali" / "dali16" (DALI's CPU decoder with
    dtype UINT8 / UINT16 and adjust_orientation=False, then `to_rgb8` and our orientation), or on
    a GPU "nvjpeg" (torchvision's `decode_jpeg(device="cuda")`) / "dali_mixed" (DALI's "mixed"
    decoder), each file alone, then `to_rgb8` and our orientation; a file the GPU decoder
    refuses gives {"error:NAME": its message} instead."""
    from stellar.data import decode

    out = {}
    if mode == "reference":
        for n in names:
            out[n] = decode.decode_file(root / n).permute(1, 2, 0).numpy()
    elif mode == "torchvision":
        for n in names:
            out[n] = decode.decode_bytes_torchvision((root / n).read_bytes(), n).permute(1, 2, 0).numpy()
    elif mode in ("dali", "dali16"):
        import torch
        from nvidia.dali import fn, pipeline_def, types

        names = [n for n in names if not n.lower().endswith(".gif")]  # DALI has no GIF decoder
        files = [str(root / n) for n in names]

        @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
        def pipe():
            enc, _ = fn.readers.file(files=files)
            return fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False,
                                     dtype=types.UINT16 if mode == "dali16" else types.UINT8)

        p = pipe()
        p.build()
        (images,) = p.run()
        for i, n in enumerate(names):
            img = torch.from_dlpack(images[i])  # uint8 or uint16 [H, W, 3]
            data = (root / n).read_bytes()
            img = decode.apply_orientation(decode.to_rgb8(img, layout="HWC"), decode.read_orientation(data), layout="HWC")
            out[n] = img.numpy().copy()
    elif mode == "nvjpeg":  # torchvision's GPU decode, file by file (a failure names its file)
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        for n in names:
            data = (root / n).read_bytes()
            try:
                img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device="cuda")
            except RuntimeError as e:
                out[f"error:{n}"] = np.array(" ".join(str(e).split())[:300])
                continue
            img = decode.apply_orientation(decode.to_rgb8(img), decode.read_orientation(data))
            out[n] = img.permute(1, 2, 0).cpu().numpy()
    elif mode == "dali_mixed":  # DALI's GPU decoder, file by file
        import torch
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=0, exec_dynamic=True)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(enc, device="mixed", output_type=types.RGB, adjust_orientation=False)

        def build():
            built = pipe()
            built.build()
            return built

        p = build()
        for n in names:
            data = (root / n).read_bytes()
            try:
                (images,) = p.run(encoded=[np.frombuffer(data, np.uint8)])
            except RuntimeError as e:
                out[f"error:{n}"] = np.array(" ".join(str(e).split())[-300:])
                p = build()  # a pipeline that failed is unusable
                continue
            img = torch.from_dlpack(images[0])
            img = decode.apply_orientation(decode.to_rgb8(img, layout="HWC"), decode.read_orientation(data), layout="HWC")
            out[n] = img.cpu().numpy()
    else:
        raise ValueError(f"mode must be reference, torchvision, dali, dali16, nvjpeg or dali_mixed, got {mode!r}")
    return out


if __name__ == "__main__":
    modes, root, dest, *names = sys.argv[1:]
    arrays = {}
    for mode in modes.split(","):  # a decoder's failure on a file comes back as "MODE/error:NAME"
        arrays.update({f"{mode}/{n}": a for n, a in _decode_all(mode, Path(root), names).items()})
    np.savez(dest, **arrays)
