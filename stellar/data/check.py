"""Find the images a loader cannot decode, before the first epoch: `stellar data check DIR`.

Users' folders hold files that no decoder takes (truncated downloads, HTML saved as .jpg) and
files that crash one: torchvision's libpng segfaults the process on a PNG with a bad row filter.
`check_images` looks at every image under a folder and writes the bad ones to a list (default
`<DIR>/.stellar_bad_files.txt`: a comment line, then one file per line, its path relative to
the list's folder, a tab, the reason); every loader backend reads that list and skips the files
on it (`read_bad_list`, `read_bad_reasons`).

What is done per file (`stellar.data.decode` has the details):
1. the screen, `probe_bytes`: the container read in Python, no native decoder, so it cannot
   crash. JPEG and PNG are checked end to end (markers to the end-of-image marker; chunk CRCs,
   the zlib stream and every row's filter byte), which is what the native decoders fail on;
2. the reference decode (Pillow) for the formats the screen only reads the header of (GIF,
   WebP, BMP, TIFF, PNM), and for every file with `full=True`; `decoders=("reference",
   "torchvision")` also runs torchvision's CPU decoders on each file.
Step 2 runs native code on untrusted bytes, so it never runs in the checker's process: it runs
in worker processes (`_GuardedPool`: plain subprocesses fed through pipes); a worker that dies
marks the file it was on as bad, with the signal ("decoder crashed (SIGSEGV)"), and is replaced;
a worker stuck on one file for `timeout` seconds is killed the same way. Step 1 runs in the
workers too when the folder is large enough for the processes to pay for their start
(`PROCESS_SCREEN_MIN` files), and in threads of this process otherwise (it cannot crash).

Measured on the 2-core dev machine under load (3,000 JPEGs 500x375 of 78 KB, 500 PNGs of
390 KB): the screen ran at 3,300 JPEGs/s and 220 PNGs/s (a PNG's zlib stream is inflated),
the full decode (`--full`, 2 workers) at 130 JPEGs/s and 39 PNGs/s; the earlier header-and-tail
check at 2,500 files/s over both.

A JPEG whose entropy-coded data is damaged but whose markers are intact passes the screen: the
JPEG decoders recover from those (with grey blocks), as the loaders do at run time.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stellar.data import decode as _decode

BAD_LIST_NAME = ".stellar_bad_files.txt"
DECODERS = ("reference", "torchvision")
# Below this many files the screen runs in threads of this process: on the 2-core dev machine
# (loaded) threads screened 3,000 JPEGs at 3,300 files/s against 1,500 for 2 worker processes,
# and 500 PNGs at 220 against 150 files/s. Processes pay off with many cores and big folders.
PROCESS_SCREEN_MIN = 20_000
DEFAULT_TIMEOUT = 120.0  # seconds one file may take in a worker


def find_images(root) -> list[Path]:
    """Every image file under `root` (by extension, `decode.IMAGE_EXTS`, case-insensitive), sorted;
    hidden entries skipped."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"root must be a folder of images, got {str(root)!r}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(_decode.IMAGE_EXTS):
                found.append(Path(dirpath) / name)
    return sorted(found)


# ------------------------------------------------------------------------------------------------
# one file
# ------------------------------------------------------------------------------------------------
def _validate_decoders(decoders) -> tuple:
    decoders = tuple(decoders)
    unknown = [d for d in decoders if d not in DECODERS]
    if not decoders or unknown:
        raise ValueError(f"decoders must be a non-empty subset of {DECODERS}, got {decoders!r}")
    return decoders


def check_file(path, full: bool = False, decoders=("reference",), max_pixels: int = _decode.MAX_PIXELS) -> str | None:
    """Why `path` cannot be decoded, or None when it is fine (the module docstring's steps; a
    decode runs in a worker process, started for this call)."""
    return check_paths([path], full=full, decoders=decoders, max_pixels=max_pixels, num_workers=1)[str(path)]


# ------------------------------------------------------------------------------------------------
# many files: the guarded worker pool
# ------------------------------------------------------------------------------------------------
def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


# A worker runs stellar/data/decode.py alone, under the module name "__check_worker__" (its
# loop, `_check_worker_main`): importing the stellar package would import torch, ~2 s a worker.
_WORKER_BOOT = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('__check_worker__', sys.argv[1]); "
    "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; "
    "sys.argv = sys.argv[1:]; spec.loader.exec_module(m)"
)


class _Worker:
    """One worker subprocess: jobs go in as JSON lines on stdin, results come back on stdout.

    args: `_check_worker_main`'s [mode, decoders, max_pixels, screen]."""

    def __init__(self, args: list[str]):
        env = dict(os.environ, OMP_NUM_THREADS="1")  # one decode per process: no thread pools
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, _decode.__file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.inflight: deque[int] = deque()
        self.since = time.monotonic()  # when the file at the head of `inflight` started
        self.out = b""
        self.err = deque(maxlen=20)  # the worker's last stderr lines (libpng prints its error there)
        self.err_partial = b""
        for stream in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(stream.fileno(), False)

    def send(self, index: int, path: str) -> None:
        if not self.inflight:
            self.since = time.monotonic()
        self.inflight.append(index)
        self.proc.stdin.write((json.dumps([index, path]) + "\n").encode())
        self.proc.stdin.flush()

    def stderr_tail(self) -> str:
        lines = [ln.decode(errors="replace").strip() for ln in self.err if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "warnings.warn"))]
        return lines[-1][:200] if lines else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


class _GuardedPool:
    """Runs `decode._check_worker_main` (the screen, or the decoders) for many files in worker processes
    that may die.

    Each worker takes up to `depth` files at a time; when it dies (a decoder crashed) or is killed
    (a file took over `timeout` s), the file at the head of its queue gets the reason, the others
    go back to the queue, and a fresh worker takes its place.
    """

    def __init__(self, num_workers: int, worker_args: list[str], timeout: float, depth: int = 4):
        self.num_workers, self.worker_args, self.timeout, self.depth = num_workers, worker_args, timeout, depth

    def run(self, paths: list[str], progress=None) -> dict[int, str | None]:
        todo = deque(range(len(paths)))
        results: dict[int, str | None] = {}
        workers: list[_Worker] = []
        sel = selectors.DefaultSelector()

        def start():
            w = _Worker(self.worker_args)
            workers.append(w)
            sel.register(w.proc.stdout, selectors.EVENT_READ, (w, "out"))
            sel.register(w.proc.stderr, selectors.EVENT_READ, (w, "err"))
            return w

        def retire(w, reason_for_head):
            sel.unregister(w.proc.stdout)
            sel.unregister(w.proc.stderr)
            w.kill()
            workers.remove(w)
            if w.inflight:
                results[w.inflight.popleft()] = reason_for_head
                todo.extendleft(reversed(w.inflight))

        def feed(w):
            while todo and len(w.inflight) < self.depth:
                i = todo.popleft()
                try:
                    w.send(i, paths[i])
                except (BrokenPipeError, OSError):  # the worker died: its exit is handled on EOF
                    w.inflight.pop()
                    todo.appendleft(i)
                    return

        try:
            for _ in range(min(self.num_workers, len(paths))):
                feed(start())
            while len(results) < len(paths):
                for key, _ in sel.select(timeout=0.5):
                    w, kind = key.data
                    if w not in workers:
                        continue
                    try:
                        chunk = os.read(key.fileobj.fileno(), 1 << 16)
                    except BlockingIOError:
                        continue
                    if kind == "err":
                        if chunk:
                            *lines, w.err_partial = (w.err_partial + chunk).split(b"\n")
                            w.err.extend(lines)
                        continue
                    if not chunk:  # EOF: the worker is gone
                        code = w.proc.wait()
                        time.sleep(0.01)
                        try:  # whatever it printed last (libpng's message) is still in the pipe
                            w.err.extend((w.err_partial + os.read(w.proc.stderr.fileno(), 1 << 16)).split(b"\n"))
                        except (BlockingIOError, OSError):
                            pass
                        tail = w.stderr_tail()
                        why = f"decoder crashed ({_signal_name(code)})" if code < 0 else f"checker worker exited with code {code}"
                        retire(w, why + (f" after: {tail}" if tail else ""))
                        if todo:
                            feed(start())
                        continue
                    *lines, w.out = (w.out + chunk).split(b"\n")
                    for line in lines:
                        index, reason = json.loads(line)
                        if w.inflight and w.inflight[0] == index:
                            w.inflight.popleft()
                            w.since = time.monotonic()
                        results[index] = reason
                        if progress is not None:
                            progress(len(results), len(paths))
                    feed(w)
                now = time.monotonic()
                for w in list(workers):
                    if w.inflight and now - w.since > self.timeout:
                        retire(w, f"decoder timed out (over {self.timeout:g} s on this file)")
                        if todo:
                            feed(start())
                if not workers and len(results) < len(paths):
                    feed(start())
        finally:
            for w in list(workers):
                w.proc.stdin.close()
                w.kill()
            sel.close()
        return results


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def check_paths(
    paths,
    full: bool = False,
    decoders=("reference",),
    max_pixels: int = _decode.MAX_PIXELS,
    num_workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress=None,
    stats: dict | None = None,
    screen: bool = True,
) -> dict[str, str | None]:
    """{path: reason or None} for every path (the module docstring's steps).

    num_workers: worker processes (default: the CPUs this process may use); progress: called as
    progress(done, total) now and then; stats: filled with the counts per step ("screened",
    "decoded", "screen_in_processes"). screen=False (with full=True) hands the raw bytes to the
    decoders, to see what they do with them: a crash is reported as such, the check goes on.
    """
    if not screen and not full:
        raise ValueError("screen=False needs full=True (without the screen, only a decode can judge a file)")
    decoders = _validate_decoders(decoders)
    paths = [str(p) for p in paths]
    workers = _default_workers() if num_workers is None else int(num_workers)
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
    reasons: dict[str, str | None] = {}
    stats = {} if stats is None else stats
    stats.update(screened=0, decoded=0, screen_in_processes=False)
    worker_args = [",".join(decoders), str(max_pixels), "1" if screen else "0"]
    if full:
        to_decode = paths
    else:
        stats["screened"] = len(paths)
        if len(paths) >= PROCESS_SCREEN_MIN and workers > 1:
            stats["screen_in_processes"] = True
            pool = _GuardedPool(workers, ["screen", *worker_args], timeout, depth=16)
            raw = pool.run(paths, progress)
            verdicts = [raw[i] for i in range(len(paths))]
        else:
            with ThreadPoolExecutor(max_workers=min(8, 2 * workers)) as threads:  # mostly file reads and zlib
                verdicts = list(threads.map(lambda p: _decode.screen_verdict(p, max_pixels), paths))
            if progress is not None:
                progress(len(paths), len(paths))
        to_decode = [p for p, v in zip(paths, verdicts) if v == _decode.NEEDS_DECODE]
        reasons.update((p, v) for p, v in zip(paths, verdicts) if v != _decode.NEEDS_DECODE)
    if to_decode:
        stats["decoded"] = len(to_decode)
        pool = _GuardedPool(min(workers, len(to_decode)), ["decode", *worker_args], timeout)
        raw = pool.run(to_decode, progress if full else None)
        reasons.update({p: raw[i] for i, p in enumerate(to_decode)})
    return {p: reasons[p] for p in paths}


# ------------------------------------------------------------------------------------------------
# folders and the list
# ------------------------------------------------------------------------------------------------
def default_list_path(root) -> Path:
    return Path(root) / BAD_LIST_NAME


def check_images(
    root,
    out=None,
    full: bool = False,
    num_workers: int | None = None,
    decoders=("reference",),
    max_pixels: int = _decode.MAX_PIXELS,
    timeout: float = DEFAULT_TIMEOUT,
    write: bool = True,
    progress=None,
) -> dict:
    """Check every image under `root`, write the bad ones to a list.

    out: the list's path (default `<root>/.stellar_bad_files.txt`); paths in it are relative to
    the list's folder when they lie under it, absolute otherwise; write=False only returns the
    result (a read-only dataset). num_workers: worker processes (default: the usable CPUs).
    Returns dict(total=number of images, bad=[absolute paths, sorted], reasons={path: why},
    list_path=str, seconds=wall time, files_per_s, screened=files screened, decoded=files decoded
    in worker processes).
    """
    start = time.perf_counter()
    files = find_images(root)
    list_path = Path(out) if out is not None else default_list_path(root)
    stats: dict = {}
    found = check_paths(files, full=full, decoders=decoders, max_pixels=max_pixels, num_workers=num_workers,
                        timeout=timeout, progress=progress, stats=stats)
    bad = {str(Path(p).resolve()): r for p, r in found.items() if r is not None}
    if write:
        write_bad_list(list_path, bad, total=len(files))
    seconds = time.perf_counter() - start
    return dict(
        total=len(files),
        bad=sorted(bad),
        reasons=bad,
        list_path=str(list_path),
        seconds=seconds,
        files_per_s=len(files) / seconds if seconds > 0 else float("inf"),
        screened=stats["screened"],
        decoded=stats["decoded"],
    )


def write_bad_list(list_path, reasons: dict, total: int | None = None) -> None:
    """Write {absolute path: reason} as the list `read_bad_list` reads."""
    list_path = Path(list_path)
    base = list_path.parent.resolve()
    lines = [f"# stellar data check: {len(reasons)} bad" + (f" of {total} images" if total is not None else "")]
    for p in sorted(reasons):
        try:
            shown = str(Path(p).relative_to(base))
        except ValueError:
            shown = p
        lines.append(f"{shown}\t{' '.join(str(reasons[p]).split())}")
    list_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = list_path.with_name(list_path.name + f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, list_path)  # a loader reading the list never sees half of it


def read_bad_reasons(list_path) -> dict[str, str]:
    """{absolute path: reason} of a list written by `check_images` (empty if there is none)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        return {}
    base = list_path.parent.resolve()
    bad = {}
    for line in list_path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, reason = line.partition("\t")
        bad[str((base / name).resolve())] = reason
    return bad


def read_bad_list(list_path) -> set[str]:
    """The absolute paths named in a list written by `check_images` (empty set if there is none)."""
    return set(read_bad_reasons(list_path))


def main(argv=None) -> int:
    """`stellar data check DIR [--out FILE] [--full] [--torchvision] [--workers N]`."""
    parser = argparse.ArgumentParser(prog="stellar data check", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="folder of images (searched recursively)")
    parser.add_argument("--out", default=None, help=f"where the list goes (default DIR/{BAD_LIST_NAME})")
    parser.add_argument("--full", action="store_true", help="decode every image with the reference decoder too (slower)")
    parser.add_argument("--torchvision", action="store_true", help="with --full: also decode with torchvision's CPU decoders")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the usable CPUs)")
    parser.add_argument("--max-pixels", type=int, default=_decode.MAX_PIXELS, help="refuse images larger than this (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds one file may take (default %(default)s)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    last = [time.monotonic()]

    def progress(done, total):
        if total >= 1000 and (time.monotonic() - last[0] > 5 or done == total):
            last[0] = time.monotonic()
            print(f"  checked {done}/{total}", file=sys.stderr, flush=True)

    try:
        result = check_images(args.dir, out=args.out, full=args.full, num_workers=args.workers,
                              decoders=("reference", "torchvision") if args.torchvision else ("reference",),
                              max_pixels=args.max_pixels, timeout=args.timeout, progress=progress)
    except NotADirectoryError as e:
        print(f"stellar data check: {e}", file=sys.stderr)
        return 2
    print(
        f"{result['total']} images, {len(result['bad'])} bad "
        f"(checked in {result['seconds']:.2f} s, {result['files_per_s']:.0f} files/s; "
        f"{result['decoded']} decoded in worker processes); list written to {result['list_path']}"
    )
    for p in result["bad"]:
        print(f"  {p}: {result['reasons'][p]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
