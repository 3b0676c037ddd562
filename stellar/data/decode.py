"""Image bytes -> uint8 RGB pixels, the same in every loader backend; and a check that cannot crash.

The reference decode (`decode_bytes`, `decode_file`) is Pillow. Every other decoder (torchvision's
libjpeg-turbo / libpng on the CPU, nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`,
DALI's `fn.decoders.image`) must give what it gives, and does so through three helpers:
`to_rgb8` (dtype and channels), `read_orientation` + `apply_orientation` (EXIF), and the screen
(`probe_bytes` / `screen_verdict` / `screen_file`) that keeps bytes a native decoder would crash on
away from it.

What the reference returns, for every file it accepts: uint8 `Tensor[3, H, W]`, RGB, upright.
- 8-bit modes go through `PIL.Image.convert("RGB")`: grayscale is replicated, alpha is dropped
  (not composited: RGBA, LA, palette with a tRNS chunk all give their colour channels), CMYK and
  YCCK JPEGs go through Pillow's CMYK -> RGB (R = (255 - C)(255 - K) / 255, rounded).
- 16-bit samples keep their high byte, `v >> 8` (= floor(v / 256)). Pillow itself reduces 16-bit
  RGB, RGBA and LA PNGs that way when it reads them, so 16-bit grayscale (mode I;16) is reduced
  the same way to keep one rule. 32-bit integer images (mode I) are clipped to [0, 65535] first;
  float images (mode F) are scaled by 255 when their maximum is <= 1 and clipped to [0, 255].
- EXIF orientation is applied, read by *this module's* parser (`read_orientation`: JPEG APP1
  "Exif", PNG eXIf, WebP EXIF, TIFF's own IFD0), not Pillow's, so that every backend reads the
  same tag the same way: a missing, unreadable or out-of-range (not 1..8) tag means 1 (as is).
  A broken EXIF block never makes an image bad.
- The file must first pass the screen (below); then Pillow must decode it fully (a truncated file
  raises; `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False, its default).
Every failure raises `DecodeError` (an OSError) whose message names the file and the reason.

Facts about the other decoders, measured with torchvision 0.29 / DALI 2.4 on the CPU here, or
read in their documentation (marked "docs"); each loader backend must follow the last column:

| decoder | 16-bit PNG | EXIF orientation | do this |
|---|---|---|---|
| torchvision `decode_image` / `decode_png` (CPU) | uint16 [0, 65535] (also with mode RGB) | applied only with `apply_exif_orientation=True` (JPEG and PNG only, docs) | `mode=ImageReadMode.RGB, apply_exif_orientation=False`, then `to_rgb8`, then `apply_orientation(img, read_orientation(data))` |
| torchvision `decode_jpeg(device="cuda")` (nvJPEG) | - | *ignored* on CUDA (docs: "only implemented for JPEG format on CPU") | same as above |
| DALI `fn.decoders.image` (cpu and mixed) | rounds `v / 257` with the default `dtype=UINT8` (measured: differs from the reference by up to 1 level); exact 16-bit with `dtype=types.UINT16` | applied by default (`adjust_orientation=True`, docs) by nvImageCodec's own parser | `adjust_orientation=False`, then `apply_orientation` with our parser; to match 16-bit files exactly use `dtype=UINT16` + `to_rgb8`, or send 16-bit files (`probe_bytes(...).bit_depth == 16`) to the reference |

Other facts: torchvision's libpng *segfaults the process* on any libpng error (measured:
"bad adaptive filter value", "IDAT: incorrect data check") -- its error handler does not return
-- so bytes must pass the screen before libpng sees them; truncated PNGs it refuses cleanly
("Out of bound read"). DALI raises on the same files but with nvImageCodec's failures it names
no file (e.g. "nvImageCodec failure: '#17'" for a truncated PNG). CMYK JPEGs: DALI and the
reference differ by up to 1 level (rounding of the CMYK -> RGB product, measured). Baseline YCbCr
JPEGs: torchvision CPU, DALI CPU and Pillow all use libjpeg-turbo and agreed exactly here, as
they did (after `apply_orientation`) on the 66 good 8-bit JPEG/PNG/WebP files of the real corpus
of tests/get_real_corpus.sh.

The screen (`probe_bytes`) reads the container without running any native decoder, so it
cannot crash, and refuses with a reason:
- JPEG: start-of-image at byte 0 (junk before it is named), every marker segment within the file
  (junk between segments is skipped, as Pillow and libjpeg do), one 8-bit Huffman frame
  (SOF0/1/2) with 1, 3 or 4 components, sampling factors 1..4, exact segment lengths where
  libjpeg demands them, quantization and Huffman tables well formed and defined before the scan
  that uses them (sequential libjpeg has built-in Huffman tables 0 and 1), scan parameters
  libjpeg accepts (progression, blocks per MCU), no second scan in a single-scan image, then
  every scan up to the end-of-image marker (a truncated file has none); and the few segments
  Pillow refuses (short JFIF / Adobe / ICC segments, marker 0xFF01).
- PNG: signature, every chunk's length and CRC (after the image data only the structure: DALI's
  parser reads on to IEND, no decoder here checks those CRCs), IHDR first and valid (bit depth /
  colour type, width and height <= 1,000,000: libpng's limit), PLTE for palette images, the
  ancillary chunks Pillow parses before the image data (tRNS, gAMA, cHRM, sRGB, pHYs, iCCP,
  zTXt, acTL, fcTL), consecutive IDATs whose zlib stream inflates completely with a valid
  Adler-32 to at least the size the header implies, every row's filter-type byte <= 4 (each
  Adam7 pass's rows for interlaced files), IEND. This is everything libpng raises an error on,
  so a PNG that passes does not crash torchvision. (A PNG that Pillow alone would decode -- one
  whose chunks after the image data are damaged or missing -- is refused: DALI fails on it.)
- all formats: width, height >= 1 and width * height <= `max_pixels` (default Pillow's
  decompression-bomb threshold, 89,478,485); empty files, HTML/text saved as an image and unknown
  formats are named as such; a path that is not a regular file (a FIFO) is refused unread.
GIF, WebP, BMP and TIFF get header (WebP: container) checks only; their `ImageInfo.verified`
is False, meaning "decode it to be sure" (`stellar.data.check` then decodes them with the
reference in a worker process). Binary PNM gets a size check and counts as verified.
The rules come from the decoders' sources and were fuzzed: on 12,000 damaged JPEG, PNG, GIF and
WebP files, every file the screen vouched for decoded with Pillow and torchvision (no error, no
crash); of the 4,497 refused in one run of 6,000, 14 decoded with both (all PNGs damaged after
the image data) and 46 crashed torchvision.

Everything here is a plain function of its arguments (no global state): picklable, safe in
DataLoader workers; `to_rgb8` and `apply_orientation` run on any device without host syncs.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that make tensors: the check's worker processes load
# this file alone (no torch, no stellar package: ~0.2 s to start instead of ~2 s), see the end.

__all__ = [
    "DecodeError",
    "ImageInfo",
    "MAX_PIXELS",
    "decode_file",
    "decode_bytes",
    "decode_bytes_torchvision",
    "to_rgb8",
    "read_orientation",
    "apply_orientation",
    "probe_bytes",
    "screen_file",
    "screen_verdict",
    "NEEDS_DECODE",
    "IMAGE_EXTS",
    "read_bytes",
]

MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: above it Pillow warns, at 2x it refuses
PNG_MAX_SIDE = 1_000_000  # libpng's default user limit on width and height
JPEG_MAX_SIDE = 65_500  # libjpeg's JPEG_MAX_DIMENSION

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The file names the listers take (`stellar.data.folder.list_images`, `stellar.data.check.find_images`):
# the formats `probe_bytes` knows.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")
NEEDS_DECODE = "\0decode"  # `screen_verdict` of a file whose container passes but that only a decode can judge


class DecodeError(OSError):
    """A file that cannot be decoded; `name` is the file, `reason` why (one line)."""

    def __init__(self, name, reason: str):
        self.name = str(name) if name is not None else "<bytes>"
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"{self.name}: {self.reason}")

    def __reduce__(self):  # picklable across DataLoader workers / processes
        return (type(self), (self.name, self.reason))


@dataclass(frozen=True)
class ImageInfo:
    """What the screen read from a file's container, before any pixel is decoded.

    width, height: as stored (before orientation); channels: components as stored (JPEG: 1, 3
    or 4; PNG: 1 gray, 2 gray+alpha, 3 RGB or palette, 4 RGBA); bit_depth: bits per sample
    (8, or 16 for 16-bit PNGs; 1/2/4 for low-depth PNGs); orientation: EXIF 1..8 (1 when absent);
    verified: the structural check covered the whole file (JPEG and PNG), False where only the
    header was read; notes: facts a fast decoder may care about ("progressive", "interlaced",
    "palette", "cmyk", "ycck", "qtable16", "arithmetic", "trailing-data", ...).
    """

    format: str
    width: int
    height: int
    channels: int
    bit_depth: int
    orientation: int = 1
    verified: bool = False
    notes: tuple = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------------
# bytes in
# ------------------------------------------------------------------------------------------------
def read_bytes(path) -> bytes:
    """A file's bytes; a DecodeError naming the file when it cannot be read (or is not a regular
    file: opening a FIFO named x.jpg would block forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DecodeError(path, "not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except DecodeError:
        raise
    except OSError as e:
        raise DecodeError(path, f"cannot read the file: {e.strerror or e}") from e


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    torch = sys.modules.get("torch")  # a tensor can only come from an imported torch
    if torch is not None and isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1 or data.device.type != "cpu":
            raise TypeError(f"data must be a 1-D uint8 CPU tensor of encoded bytes, got {data.dtype} {tuple(data.shape)} on {data.device}")
        return data.contiguous().numpy().tobytes()
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"data must be a 1-D uint8 array of encoded bytes, got {data.dtype} {data.shape}")
        return data.tobytes()
    raise TypeError(f"data must be bytes, a 1-D uint8 tensor or array, got {type(data).__name__}")


# ------------------------------------------------------------------------------------------------
# EXIF orientation
# ------------------------------------------------------------------------------------------------
def _tiff_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 of a TIFF structure (an EXIF block); 1 when unreadable."""
    if len(tiff) < 8:
        return 1
    if tiff[:4] == b"II*\x00":
        e = "<"
    elif tiff[:4] == b"MM\x00*":
        e = ">"
    else:
        return 1
    (ifd,) = struct.unpack(e + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(e + "H", tiff[ifd : ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            return 1
        tag, typ, n = struct.unpack(e + "HHI", entry[:8])
        if tag != 0x0112:
            continue
        if n < 1:
            return 1
        if typ == 3:  # SHORT, the standard type
            (value,) = struct.unpack(e + "H", entry[8:10])
        elif typ == 4:  # LONG
            (value,) = struct.unpack(e + "I", entry[8:12])
        elif typ in (1, 7):  # BYTE, UNDEFINED
            value = entry[8]
        else:
            return 1
        return value if 1 <= value <= 8 else 1
    return 1


def _exif_block_orientation(block: bytes) -> int:
    if block.startswith(b"Exif\x00\x00"):
        block = block[6:]
    return _tiff_orientation(block)


def read_orientation(data) -> int:
    """The EXIF orientation (1..8) of encoded image bytes; 1 when absent, unreadable or out of range.

    JPEG: the first APP1 segment starting "Exif\\0\\0" before the first scan; PNG: the first eXIf
    chunk (before or after the image data); WebP: the EXIF chunk; TIFF: its own IFD0. Reads only
    headers (cheap: no pixel data is scanned, except hopping over PNG chunks).
    """
    data = _as_bytes(data)
    try:
        if data[:3] == b"\xff\xd8\xff":
            pos = 2
            while pos + 4 <= len(data) and data[pos] == 0xFF:
                marker = data[pos + 1]
                if marker == 0xFF:
                    pos += 1
                    continue
                if marker == 0xDA or marker == 0xD9:
                    break
                if 0xD0 <= marker <= 0xD7 or marker == 0x01:
                    pos += 2
                    continue
                (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
                if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
                    return _exif_block_orientation(data[pos + 4 : pos + 2 + length])
                pos += 2 + length
            return 1
        if data[:8] == _PNG_MAGIC:
            pos = 8
            while pos + 8 <= len(data):
                length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
                if ctype == b"eXIf":
                    return _exif_block_orientation(data[pos + 8 : pos + 8 + length])
                if ctype == b"IEND":
                    break
                pos += 12 + length
            return 1
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            pos = 12
            while pos + 8 <= len(data):
                ctype, length = struct.unpack("<4sI", data[pos : pos + 8])
                if ctype == b"EXIF":
                    return _exif_block_orientation(data[pos + 8 : pos + 8 + length])
                pos += 8 + length + (length & 1)
            return 1
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_orientation(data)
    except struct.error:
        return 1
    return 1


def apply_orientation(img: torch.Tensor, orientation: int, layout: str = "CHW") -> torch.Tensor:
    """Turn an image as stored into the upright image its EXIF orientation describes.

    img: Tensor[C, H, W] (layout "CHW") or Tensor[H, W, C] ("HWC"), any dtype and device;
    orientation: 1..8. Returns the same layout, H and W swapped for 5..8: orientation 1 returns
    `img` itself, the others a contiguous copy (flip / transpose on the tensor's device, no host
    sync). The eight cases are Pillow's `ImageOps.exif_transpose`: 2 mirror left-right,
    3 rotate 180, 4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
    8 rotate 90 counter-clockwise.
    """
    import torch

    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout must be 'CHW' or 'HWC', got {layout!r}")
    if isinstance(orientation, bool) or not isinstance(orientation, (int, np.integer)) or not 1 <= orientation <= 8:
        raise ValueError(f"orientation must be an int in 1..8, got {orientation!r}")
    if not isinstance(img, torch.Tensor) or img.dim() != 3:
        raise ValueError(f"img must be a 3-D tensor ({layout}), got {getattr(img, 'shape', type(img))}")
    if orientation == 1:
        return img
    h, w = (-2, -1) if layout == "CHW" else (0, 1)
    if orientation >= 5:
        img = img.transpose(h, w)
    flips = {2: (w,), 3: (h, w), 4: (h,), 5: (), 6: (w,), 7: (h, w), 8: (h,)}[int(orientation)]
    return img.flip(flips).contiguous() if flips else img.contiguous()


# ------------------------------------------------------------------------------------------------
# native decoder output -> the reference's 8-bit RGB
# ------------------------------------------------------------------------------------------------
def to_rgb8(img: torch.Tensor, layout: str = "CHW") -> torch.Tensor:
    """A native decoder's output as the reference's uint8 RGB, on the same device, no host sync.

    img: Tensor[C, H, W] ("CHW", torchvision) or Tensor[H, W, C] ("HWC", DALI), dtype uint8 or
    uint16 (16-bit PNGs), C = 1 (gray: replicated), 2 (gray + alpha: alpha dropped), 3 (RGB) or
    4 (RGBA: alpha dropped). 16-bit samples keep their high byte, `v >> 8`, as the reference.
    Returns the same layout with C = 3 (`img` itself when it is already uint8 with 3 channels).
    Decode JPEGs with an RGB output mode (torchvision `ImageReadMode.RGB`, DALI `types.RGB`): a
    4-channel input is taken as RGBA, never as CMYK.
    """
    import torch

    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout must be 'CHW' or 'HWC', got {layout!r}")
    if not isinstance(img, torch.Tensor) or img.dim() != 3:
        raise ValueError(f"img must be a 3-D tensor ({layout}), got {getattr(img, 'shape', type(img))}")
    c_dim = 0 if layout == "CHW" else 2
    c = img.shape[c_dim]
    if c not in (1, 2, 3, 4):
        raise ValueError(f"img must have 1, 2, 3 or 4 channels (dim {c_dim} of {layout}), got shape {tuple(img.shape)}")
    if img.dtype == torch.uint16:
        # torch has no uint16 shift on every device: the same bits as int16, shift, keep 8 bits
        img = img.view(torch.int16).bitwise_right_shift(8).bitwise_and(0xFF).to(torch.uint8)
    elif img.dtype != torch.uint8:
        raise ValueError(f"img must be uint8 or uint16, got {img.dtype}")
    if c == 3:
        return img
    if c == 4:
        return img.narrow(c_dim, 0, 3).contiguous()
    shape = list(img.shape)
    shape[c_dim] = 3
    return img.narrow(c_dim, 0, 1).expand(shape).contiguous()


# ------------------------------------------------------------------------------------------------
# the screen: containers read in Python, no native decoder
# ------------------------------------------------------------------------------------------------
def _bad(reason: str):
    raise _Refused(reason)


class _Refused(Exception):
    pass


def _check_size(fmt, w, h, max_pixels, side_limit=None):
    if w < 1 or h < 1:
        _bad(f"{fmt} header gives an empty image ({w}x{h})")
    if side_limit is not None and max(w, h) > side_limit:
        _bad(f"{fmt} header gives {w}x{h}, over the {side_limit} pixel side limit of its decoder (a broken header?)")
    if w * h > max_pixels:
        _bad(f"{fmt} header gives {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (a decompression bomb or a broken header)")


# JPEG ---------------------------------------------------------------------------------------


def _jpeg_markers(data: bytes) -> np.ndarray:
    """Offsets p with data[p] == 0xFF and data[p+1] a marker code: not a stuffed 0x00, a restart
    marker (inside scans) or another 0xFF (fill). Vectorized: the scans are most of the file."""
    a = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(a[:-1] == 0xFF)
    nxt = a[ff + 1]
    return ff[(nxt != 0) & (nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7))]
_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_SOF_OTHER = {0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical",
              0xC9: "arithmetic", 0xCA: "arithmetic", 0xCB: "arithmetic lossless", 0xCD: "hierarchical",
              0xCE: "hierarchical", 0xCF: "hierarchical"}


def _check_dht(seg: bytes, pos: int, tables: dict) -> None:
    """A DHT segment as libjpeg reads it (get_dht, jpeg_make_d_derived_tbl); sets
    tables[(class, id)] = whether the table can serve as a DC table (symbols <= 15)."""
    i = 0
    while i < len(seg):
        tc, th = seg[i] >> 4, seg[i] & 15
        if tc > 1 or th > 3 or i + 17 > len(seg):
            _bad(f"JPEG: malformed Huffman table segment at byte {pos}")
        counts = seg[i + 1 : i + 17]
        total = sum(counts)
        if total > 256 or i + 17 + total > len(seg):
            _bad(f"JPEG: malformed Huffman table segment at byte {pos}")
        code = 0
        for bits, count in enumerate(counts, start=1):
            code += count
            if code >= (1 << bits) and count:  # the codes of this length overflow (libjpeg: bogus table)
                _bad(f"JPEG: invalid Huffman table at byte {pos} (its codes overflow)")
            code <<= 1
        tables[(tc, th)] = tc == 1 or max(seg[i + 17 : i + 17 + total], default=0) <= 15
        i += 17 + total


def _probe_jpeg(data: bytes, max_pixels: int) -> ImageInfo:
    """The marker walk of the module docstring; each refusal is one of libjpeg's (or Pillow's)
    fatal errors, so that a file that passes decodes in both."""
    n = len(data)
    pos = 2
    frame = None  # (precision, height, width, {component id: (h, v, quant table)})
    progressive = False
    qtables: set[int] = set()
    htables: dict[tuple[int, int], bool] = {}
    notes = []
    adobe = None
    verified = True
    seen_scan = False
    scans_done = False
    markers = None

    def next_marker(start):
        nonlocal markers
        if markers is None:
            markers = _jpeg_markers(data)
        i = int(np.searchsorted(markers, start))
        if i == len(markers):
            _bad("truncated JPEG: the image data runs to the end of the file (no end-of-image marker)")
        return int(markers[i])

    while True:
        if pos + 2 > n:
            _bad(f"truncated JPEG: the file ends at byte {n} before the end-of-image marker")
        if data[pos] != 0xFF:
            # junk between segments: Pillow and libjpeg (with a warning) skip to the next marker
            pos = next_marker(pos)
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            if not seen_scan:
                _bad("JPEG ends (end-of-image marker) before any image data")
            if pos + 2 < n and data[pos + 2 :].strip(b"\x00\xff"):
                notes.append("trailing-data")
            break
        if marker == 0xD8:
            _bad(f"JPEG: a second start-of-image marker at byte {pos}")
        if 0xD0 <= marker <= 0xD7 or (marker == 0x01 and seen_scan):
            pos += 2
            continue
        if marker == 0xDA and scans_done:
            _bad(f"JPEG: a second scan at byte {pos} in a single-scan image (libjpeg: end of image expected)")
        if marker in (0xC8, 0xDE, 0xDF, 0x01) or 0xF0 <= marker <= 0xFD or 0x02 <= marker <= 0xBF:
            _bad(f"JPEG: unsupported marker 0xFF{marker:02X} at byte {pos}")
        if pos + 4 > n:
            _bad(f"truncated JPEG: the file ends inside the marker at byte {pos}")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            _bad(f"JPEG: marker 0xFF{marker:02X} at byte {pos} has an invalid length {length}")
        end = pos + 2 + length
        if end > n:
            _bad(f"truncated JPEG: the 0xFF{marker:02X} segment at byte {pos} runs past the end of the file")
        seg = data[pos + 4 : end]
        if marker == 0xDB:  # DQT: one or more tables, exactly filling the segment
            i = 0
            while i < len(seg):
                pq, tq = seg[i] >> 4, seg[i] & 15
                size = 128 if pq else 64  # any non-zero precision means 16-bit (libjpeg, Pillow)
                if tq > 3 or i + 1 + size > len(seg):
                    _bad(f"JPEG: malformed quantization table segment at byte {pos}")
                if pq and "qtable16" not in notes:
                    notes.append("qtable16")
                qtables.add(tq)
                i += 1 + size
        elif marker == 0xC4:
            _check_dht(seg, pos, htables)
        elif marker == 0xDD:
            if len(seg) != 2:
                _bad(f"JPEG: restart interval segment at byte {pos} has length {length}, not 4")
        elif marker in _SOF_SUPPORTED or marker in _SOF_OTHER:
            if frame is not None:
                _bad(f"JPEG: a second frame header at byte {pos}")
            if len(seg) < 6:
                _bad(f"JPEG: frame header at byte {pos} is too short")
            precision, height, width, nf = struct.unpack(">BHHB", seg[:6])
            if len(seg) != 6 + 3 * nf:
                _bad(f"JPEG: frame header at byte {pos} has the wrong length for {nf} components")
            if marker in _SOF_OTHER:
                notes.append(_SOF_OTHER[marker])
                verified = False  # decodable by some libjpeg builds: let the reference decide
            elif marker == 0xC2:
                notes.append("progressive")
                progressive = True
            if precision != 8 and marker in _SOF_SUPPORTED:
                _bad(f"JPEG with {precision}-bit samples (8-bit only)")
            if nf not in (1, 3, 4):
                _bad(f"JPEG with {nf} colour components (1, 3 or 4 supported)")
            comps = {}
            for k in range(nf):
                cid, hv, tq = seg[6 + 3 * k : 9 + 3 * k]
                if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4) or tq > 3:
                    _bad(f"JPEG: invalid sampling factors or table of component {cid}")
                comps.setdefault(cid, (hv >> 4, hv & 15, tq))
            if height == 0:
                _bad("JPEG with height 0 in its frame header (DNL marker: not supported)")
            _check_size("JPEG", width, height, max_pixels, JPEG_MAX_SIDE)
            frame = (precision, height, width, comps, nf)
        elif marker == 0xDA:  # SOS
            if frame is None:
                _bad(f"JPEG: scan at byte {pos} before any frame header")
            ns = seg[0] if seg else 0
            if not 1 <= ns <= 4 or len(seg) != 1 + 2 * ns + 3:
                _bad(f"JPEG: malformed scan header at byte {pos}")
            ss, se, ahal = seg[1 + 2 * ns : 4 + 2 * ns]
            ah, al = ahal >> 4, ahal & 15
            seen, blocks = set(), 0
            for k in range(ns):
                cid, tables = seg[1 + 2 * k], seg[2 + 2 * k]
                if cid not in frame[3] or cid in seen:
                    _bad(f"JPEG: scan at byte {pos} names component {cid}, which the frame lacks (or twice)")
                seen.add(cid)
                h, v, tq = frame[3][cid]
                blocks += h * v
                if tq not in qtables:
                    _bad(f"JPEG: quantization table {tq} is used before it is defined")
                for cls, tid in ((0, tables >> 4), (1, tables & 15)):
                    used = (cls == 0 and ss == 0 and ah == 0) or (cls == 1 and (not progressive or ss != 0))
                    # sequential libjpeg has built-in tables 0 and 1 for files that define none
                    if used and (tid > 3 or ((tid > 1 or progressive) and (cls, tid) not in htables)):
                        _bad(f"JPEG: scan at byte {pos} uses Huffman table {tid}, which is not defined")
                    if used and not htables.get((cls, tid), True):
                        _bad(f"JPEG: scan at byte {pos} uses an invalid DC Huffman table {tid} (symbols over 15)")
            if ns > 1 and blocks > 10:
                _bad(f"JPEG: scan at byte {pos} has {blocks} blocks per MCU (libjpeg allows 10)")
            if progressive and ((ss == 0 and se != 0) or (ss != 0 and (ss > se or se > 63 or ns != 1))
                                or (ah != 0 and al != ah - 1) or al > 13):
                _bad(f"JPEG: invalid progressive scan parameters at byte {pos} (Ss={ss} Se={se} Ah={ah} Al={al})")
            seen_scan = True
            # libjpeg reads one interleaved scan of every component as the whole image
            scans_done = not progressive and ns == frame[4]
            pos = next_marker(end)
            continue
        elif marker == 0xEE and seg[:5] == b"Adobe":
            if len(seg) < 7:
                _bad(f"JPEG: Adobe segment at byte {pos} is too short")
            adobe = seg[11] if len(seg) >= 12 else None
        elif marker == 0xE0 and seg[:4] == b"JFIF" and len(seg) < 7:
            _bad(f"JPEG: JFIF segment at byte {pos} is too short")
        elif marker == 0xE2 and seg[:12] == b"ICC_PROFILE\0" and len(seg) < 14:
            _bad(f"JPEG: ICC profile segment at byte {pos} is too short")
        pos = end
    if frame is None:
        _bad("JPEG without a frame header")
    nf = frame[4]
    if nf == 4:
        notes.append("ycck" if adobe == 2 else "cmyk")
    return ImageInfo("jpeg", frame[2], frame[1], nf, 8, read_orientation(data), verified, tuple(notes))


# PNG ----------------------------------------------------------------------------------------
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 22  # inflate at most 4 MiB at a time: a big image is checked in bounded memory


def _png_rows(width, height, bits_per_pixel, interlaced):
    """(row count, bytes per row incl. the filter byte) per pass, in stream order."""
    passes = []
    for x0, y0, dx, dy in (_ADAM7 if interlaced else ((0, 0, 1, 1),)):
        w = (width - x0 + dx - 1) // dx
        h = (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            passes.append((h, 1 + (w * bits_per_pixel + 7) // 8))
    return passes


_PNG_MIN_LENGTH = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"acTL": 8, b"fcTL": 26}
_PIL_MAX_TEXT_CHUNK = 1 << 20  # Pillow's PngImagePlugin.MAX_TEXT_CHUNK


def _check_png_ancillary(ctype: bytes, body: bytes, color: int) -> None:
    """Ancillary chunks before IDAT that Pillow refuses (libpng ignores most of them)."""
    name = ctype.decode("latin-1")
    if len(body) < _PNG_MIN_LENGTH.get(ctype, 0):
        _bad(f"PNG: {name} chunk is too short ({len(body)} bytes)")
    if ctype == b"tRNS" and ((color == 3 and len(body) > 256) or (color == 0 and len(body) < 2) or (color == 2 and len(body) < 6)):
        _bad(f"PNG: tRNS chunk of {len(body)} bytes does not fit colour type {color}")
    if ctype in (b"iCCP", b"zTXt"):
        i = body.find(b"\0")
        if ctype == b"iCCP" and not 0 <= i < len(body) - 1:
            _bad("PNG: malformed iCCP chunk")
        if i >= 0 and i + 1 < len(body):
            if body[i + 1] != 0:
                _bad(f"PNG: unknown compression method {body[i + 1]} in the {name} chunk")
            inflater = zlib.decompressobj()
            try:
                inflater.decompress(body[i + 2 :], _PIL_MAX_TEXT_CHUNK)
            except zlib.error:
                return  # Pillow drops a broken profile or text
            if inflater.unconsumed_tail:
                _bad(f"PNG: the {name} chunk inflates to over {_PIL_MAX_TEXT_CHUNK} bytes")


def _probe_png(data: bytes, max_pixels: int) -> ImageInfo:
    n = len(data)
    pos = 8
    ihdr = None
    plte = False
    idat_state = 0  # 0 before IDAT, 1 inside the IDAT run, 2 after it
    inflater = zlib.decompressobj()
    produced = 0  # bytes inflated so far
    row_starts = None  # int64 array: offsets of every row's filter byte in the inflated stream
    expected = 0
    notes = []

    def feed(chunk_data):
        nonlocal produced
        buf = chunk_data
        while True:
            try:
                out = inflater.decompress(buf, _INFLATE_STEP)
            except zlib.error as e:
                _bad(f"PNG image data (IDAT) is not a valid zlib stream: {e}")
            if out and produced < expected:
                lo = np.searchsorted(row_starts, produced)
                hi = np.searchsorted(row_starts, produced + len(out))
                if hi > lo:
                    filters = np.frombuffer(out, np.uint8)[row_starts[lo:hi] - produced]
                    if filters.max() > 4:
                        k = int(lo + np.argmax(filters > 4))
                        _bad(f"PNG row {k} has an invalid filter type {int(filters.max())} (libpng: bad adaptive filter value)")
            produced += len(out)
            buf = inflater.unconsumed_tail
            if not buf or inflater.eof:
                return

    while True:
        if pos + 8 > n:
            _bad(f"truncated PNG: the file ends at byte {n} before the IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if length > 0x7FFFFFFF:
            _bad(f"PNG chunk at byte {pos} has an invalid length {length}")
        if not all(65 <= b <= 90 or 97 <= b <= 122 for b in ctype):
            _bad(f"PNG: invalid chunk type {ctype!r} at byte {pos}")
        end = pos + 12 + length
        if end > n:
            _bad(f"truncated PNG: the {ctype.decode('latin-1')} chunk at byte {pos} runs past the end of the file")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : end])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            # after the image data only DALI's parser reads on, and it checks structure, not CRCs
            if not (idat_state and ctype != b"IDAT"):
                _bad(f"PNG: CRC mismatch in the {ctype.decode('latin-1')} chunk at byte {pos} (corrupted data)")
            if "crc-after-data" not in notes:
                notes.append("crc-after-data")
        name = ctype.decode("latin-1")
        if ihdr is None and ctype != b"IHDR":
            _bad(f"PNG: the first chunk is {name}, not IHDR")
        if ctype == b"IHDR":
            if ihdr is not None:
                _bad("PNG: a second IHDR chunk")
            if length != 13:
                _bad(f"PNG: IHDR has length {length}, not 13")
            w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", body)
            if color not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[color]:
                _bad(f"PNG: invalid bit depth {depth} for colour type {color}")
            if comp != 0 or filt != 0 or interlace > 1:
                _bad(f"PNG: invalid compression/filter/interlace method ({comp}, {filt}, {interlace})")
            if w > 0x7FFFFFFF or h > 0x7FFFFFFF:
                _bad(f"PNG header gives {w}x{h} (a broken header)")
            _check_size("PNG", w, h, max_pixels, PNG_MAX_SIDE)
            ihdr = (w, h, depth, color, interlace)
            passes = _png_rows(w, h, depth * _PNG_CHANNELS[color], interlace == 1)
            starts, offset = [], 0
            for rows, rowbytes in passes:
                starts.append(offset + rowbytes * np.arange(rows, dtype=np.int64))
                offset += rows * rowbytes
            row_starts, expected = np.concatenate(starts), offset
            if interlace:
                notes.append("interlaced")
            if color == 3:
                notes.append("palette")
        elif ctype == b"PLTE":
            if idat_state:
                _bad("PNG: PLTE chunk after the image data")
            if length == 0 or length % 3 or length > 768:
                _bad(f"PNG: invalid palette length {length}")
            plte = True
        elif ctype == b"IDAT":
            if idat_state == 2:
                _bad("PNG: IDAT chunks are not consecutive")
            if ihdr[3] == 3 and not plte:
                _bad("PNG: palette image without a PLTE chunk")
            idat_state = 1
            if not inflater.eof:
                feed(body)
        elif ctype == b"IEND":
            break
        else:
            if idat_state == 1:
                idat_state = 2
            if name[0].isupper():
                _bad(f"PNG: unknown critical chunk {name}")
            if not idat_state:  # Pillow parses these before the image data, and refuses them
                _check_png_ancillary(ctype, body, ihdr[3])
        pos = end
    if not idat_state:
        _bad("PNG without image data (no IDAT chunk)")
    if not inflater.eof:
        feed(b"")
        if produced < expected:
            _bad(f"PNG image data ends early: {produced} of {expected} bytes (truncated or corrupted)")
        _bad("PNG image data (IDAT) is not a complete zlib stream (truncated or corrupted)")
    if produced < expected:
        _bad(f"PNG image data holds {produced} of the {expected} bytes its header implies (not enough image data)")
    w, h, depth, color, _ = ihdr
    channels = 3 if color == 3 else _PNG_CHANNELS[color]
    return ImageInfo("png", w, h, channels, depth, read_orientation(data), True, tuple(notes))


# other formats: header checks -------------------------------------------------------------------
def _probe_gif(data: bytes, max_pixels: int) -> ImageInfo:
    """The header only: Pillow (the only GIF decoder here) skips what it does not know between
    blocks, so only a decode can judge the rest."""
    if len(data) < 13:
        _bad("truncated GIF header")
    w, h = struct.unpack("<HH", data[6:10])
    _check_size("GIF", w, h, max_pixels)
    return ImageInfo("gif", w, h, 3, 8, 1, False, ("palette",))


def _probe_webp(data: bytes, max_pixels: int) -> ImageInfo:
    n = len(data)
    (riff,) = struct.unpack("<I", data[4:8])
    if riff + 8 > n:
        _bad(f"truncated WebP: the RIFF header announces {riff + 8} bytes, the file has {n}")
    pos, size, alpha, notes = 12, None, False, []
    while pos + 8 <= min(n, riff + 8):
        ctype, length = struct.unpack("<4sI", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length:
            _bad(f"truncated WebP: the {ctype!r} chunk runs past the end of the file")
        if ctype == b"VP8X" and length >= 10:
            w = 1 + int.from_bytes(body[4:7], "little")
            h = 1 + int.from_bytes(body[7:10], "little")
            size, alpha = (w, h), bool(body[0] & 0x10)
            if body[0] & 0x02:
                notes.append("animated")
        elif ctype == b"VP8 " and size is None:
            if length < 10 or body[3:6] != b"\x9d\x01\x2a":
                _bad("WebP: invalid VP8 frame header")
            w, h = struct.unpack("<HH", body[6:10])
            size = (w & 0x3FFF, h & 0x3FFF)
        elif ctype == b"VP8L" and size is None:
            if length < 5 or body[0] != 0x2F:
                _bad("WebP: invalid VP8L header")
            bits = int.from_bytes(body[1:5], "little")
            size, alpha = (1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)), bool(bits >> 28 & 1)
        pos += 8 + length + (length & 1)
    if size is None:
        _bad("WebP without an image chunk")
    _check_size("WebP", size[0], size[1], max_pixels)
    return ImageInfo("webp", size[0], size[1], 4 if alpha else 3, 8, read_orientation(data), False, tuple(notes))


def _probe_bmp(data: bytes, max_pixels: int) -> ImageInfo:
    if len(data) < 26:
        _bad("truncated BMP header")
    offset, dib = struct.unpack("<II", data[10:18])
    if dib == 12:
        w, h = struct.unpack("<HH", data[18:22])
        bpp = struct.unpack("<H", data[24:26])[0]
    else:
        if len(data) < 30:
            _bad("truncated BMP header")
        w, h, _, bpp = struct.unpack("<iiHH", data[18:30])
    h = abs(h)
    _check_size("BMP", w, h, max_pixels)
    if offset >= len(data):
        _bad(f"truncated BMP: pixel data at byte {offset}, the file has {len(data)}")
    return ImageInfo("bmp", w, h, 3, 8, 1, False, ())


def _probe_tiff(data: bytes, max_pixels: int) -> ImageInfo:
    e = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(e + "I", data[4:8])
        (count,) = struct.unpack(e + "H", data[ifd : ifd + 2])
        dims = {}
        for k in range(count):
            tag, typ, _, v = struct.unpack(e + "HHI4s", data[ifd + 2 + 12 * k : ifd + 14 + 12 * k])
            if tag in (256, 257):
                dims[tag] = struct.unpack(e + "H", v[:2])[0] if typ == 3 else struct.unpack(e + "I", v)[0]
    except struct.error:
        _bad("truncated TIFF header")
    if 256 not in dims or 257 not in dims:
        _bad("TIFF without image width and height")
    _check_size("TIFF", dims[256], dims[257], max_pixels)
    return ImageInfo("tiff", dims[256], dims[257], 3, 8, read_orientation(data), False, ())


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*(\d+)")


def _probe_pnm(data: bytes, max_pixels: int) -> ImageInfo:
    kind = data[1] - ord("0")
    pos, values = 2, []
    for _ in range(2 if kind in (1, 4) else 3):
        m = _PNM_TOKEN.match(data, pos)
        if m is None:
            _bad("malformed PNM header")
        values.append(int(m.group(1)))
        pos = m.end()
    w, h = values[:2]
    _check_size("PNM", w, h, max_pixels)
    maxval = values[2] if len(values) > 2 else 1
    if kind >= 4:  # binary: the data size is known
        if not 1 <= maxval <= 65535:
            _bad(f"PNM: invalid maximum value {maxval}")
        per = 1 if maxval < 256 else 2
        need = h * ((w + 7) // 8) if kind == 4 else w * h * per * (3 if kind == 6 else 1)
        if len(data) - pos - 1 < need:
            _bad(f"truncated PNM: {len(data) - pos - 1} of {need} bytes of pixel data")
    return ImageInfo("pnm", w, h, 3 if kind in (3, 6) else 1, 16 if maxval > 255 else 8, 1, kind >= 4, ())


def _describe_unknown(data: bytes) -> str:
    at = data.find(b"\xff\xd8\xff", 0, 1 << 16)
    if at > 0:
        return f"{at} bytes of junk before the JPEG start-of-image marker (not a JPEG file as it stands)"
    at = data.find(_PNG_MAGIC, 0, 1 << 16)
    if at > 0:
        return f"{at} bytes of junk before the PNG signature"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"<svg")) or b"<html" in head:
        return "not an image: an HTML/XML page saved with an image extension"
    if head[:1] in (b"{", b"[") or all(32 <= b < 127 or b in (9, 10, 13) for b in data[:256]):
        return "not an image: a text file"
    return f"not an image (unknown format, starts with {data[:8].hex(' ')})"


def probe_bytes(data, name=None, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Screen encoded bytes (module docstring) and describe them; raise DecodeError(name, reason).

    Runs no native decoder: cannot crash. JPEG and PNG are checked end to end (`verified`).
    """
    data = _as_bytes(data)
    try:
        if not data:
            _bad("empty file")
        if data[:3] == b"\xff\xd8\xff":
            return _probe_jpeg(data, max_pixels)
        if data[:8] == _PNG_MAGIC:
            return _probe_png(data, max_pixels)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _probe_gif(data, max_pixels)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 12:
            return _probe_webp(data, max_pixels)
        if data[:2] == b"BM":
            return _probe_bmp(data, max_pixels)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _probe_tiff(data, max_pixels)
        if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
            return _probe_pnm(data, max_pixels)
        _bad(_describe_unknown(data))
    except _Refused as e:
        raise DecodeError(name, str(e)) from None
    except (struct.error, IndexError, ValueError) as e:  # a header shorter than its fields
        raise DecodeError(name, f"malformed or truncated header ({type(e).__name__}: {e})") from None


def screen_verdict(path, max_pixels: int = MAX_PIXELS) -> str | None:
    """The screen on the file at `path`: why it is refused (one line), None when it passes checked
    end to end (`ImageInfo.verified`), or NEEDS_DECODE when only a decode can judge it."""
    try:
        info = probe_bytes(read_bytes(path), path, max_pixels)
    except DecodeError as e:
        return e.reason
    return None if info.verified else NEEDS_DECODE


def screen_file(path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why the screen refuses the file at `path` (one line), or None when it passes."""
    verdict = screen_verdict(path, max_pixels)
    return None if verdict == NEEDS_DECODE else verdict


# ------------------------------------------------------------------------------------------------
# the reference decode
# ------------------------------------------------------------------------------------------------
def _pil_to_rgb(img) -> np.ndarray:
    """uint8 [H, W, 3] of a loaded Pillow image, by the rules of the module docstring."""
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
        return np.repeat((arr >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "I":
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return np.repeat((arr >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        arr = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow asks for this step for palette + tRNS
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _decode_pil(data: bytes, name, max_pixels: int) -> np.ndarray:
    """Pillow's full decode of screened bytes: uint8 [H, W, 3] as stored (no orientation)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DecodeError(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(name, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            img.load()
            arr = _pil_to_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(name, "not an image Pillow can identify") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad data; all mean "bad file"
        raise DecodeError(name, f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DecodeError(name, f"decoded an empty image {arr.shape}")
    return arr


def decode_bytes(data, name=None, max_pixels: int = MAX_PIXELS, screen: bool = True) -> torch.Tensor:
    """THE reference decode: encoded bytes -> uint8 Tensor[3, H, W] RGB, upright.

    data: bytes, or a 1-D uint8 tensor / array; name: the file, for messages. The bytes pass the
    screen first (`screen=False` skips it, for bytes screened already), then Pillow decodes them
    fully. Raises DecodeError(name, reason) on anything undecodable (see the module docstring).
    """
    import torch

    data = _as_bytes(data)
    if screen:
        probe_bytes(data, name, max_pixels)
    arr = _decode_pil(data, name, max_pixels)
    out = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1).contiguous()
    return apply_orientation(out, read_orientation(data))


def decode_file(path, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The reference decode of the file at `path` (`decode_bytes`); uint8 Tensor[3, H, W]."""
    return decode_bytes(read_bytes(path), path, max_pixels)


def decode_bytes_torchvision(data, name=None, max_pixels: int = MAX_PIXELS, screen: bool = True) -> torch.Tensor:
    """torchvision's CPU decoders (libjpeg-turbo, libpng, libwebp) made to match the reference.

    The bytes pass the screen first (libpng crashes the process on bad PNG data; `screen=False`
    only for bytes screened already), then `torchvision.io.decode_image(mode=RGB,
    apply_exif_orientation=False)`, `to_rgb8`, and our orientation. Formats torchvision does not
    decode (BMP, TIFF, PNM), and GIF (torchvision returns every frame), go to `decode_bytes` by
    format, not as a fallback. uint8 Tensor[3, H, W]; DecodeError on failure.
    """
    import torch

    data = _as_bytes(data)
    info = probe_bytes(data, name, max_pixels) if screen else None
    fmt = info.format if info is not None else ("jpeg" if data[:3] == b"\xff\xd8\xff" else "png" if data[:8] == _PNG_MAGIC else "other")
    if fmt not in ("jpeg", "png", "webp"):
        return decode_bytes(data, name, max_pixels, screen=False)
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=False)
    except RuntimeError as e:
        raise DecodeError(name, f"torchvision: {e}") from None
    return apply_orientation(to_rgb8(img), read_orientation(data))


# ------------------------------------------------------------------------------------------------
# the worker processes of `stellar.data.check` run this file alone (not as part of the package,
# whose __init__ imports torch) and loop here; a decoder crash kills only the worker.
# ------------------------------------------------------------------------------------------------
def _check_worker_main(argv) -> None:
    """Read [index, path] JSON lines on stdin, write [index, verdict] lines on stdout.

    argv: [mode, decoders, max_pixels, screen]: mode "screen" (verdict: `screen_verdict`) or
    "decode" (verdict: reason or None, after the screen unless screen is "0", then each decoder
    named, in order: "reference", "torchvision").
    """
    mode, decoders, max_pixels, screen = argv[0], argv[1].split(","), int(argv[2]), argv[3] != "0"
    for line in sys.stdin:
        index, path = json.loads(line)
        try:
            if mode == "screen":
                verdict = screen_verdict(path, max_pixels)
            else:
                data = read_bytes(path)
                if screen:
                    probe_bytes(data, path, max_pixels)
                for decoder in decoders:  # in the order given; the first failure is the verdict
                    if decoder == "reference":
                        _decode_pil(data, path, max_pixels)
                    elif decoder == "torchvision":
                        decode_bytes_torchvision(data, path, max_pixels, screen=False)
                verdict = None
        except DecodeError as e:
            verdict = e.reason
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError: the file is bad for the loaders too
            verdict = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        sys.stdout.write(json.dumps([index, verdict]) + "\n")
        sys.stdout.flush()


if __name__ == "__check_worker__":
    _check_worker_main(sys.argv[1:])
