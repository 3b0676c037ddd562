"""Compile report of our GPU kernels for Hopper (sm_90), with no GPU: registers, spills, shared
memory, tensor-core use, programs and waves, per kernel and shape. Compile-time figures, not timings.

    python benchmarks/kernel_report.py                     # production shapes, every Triton kernel + nvcc
    python benchmarks/kernel_report.py --set ci --strict   # what CI runs (tests/test_kernel_report.py)
    python benchmarks/kernel_report.py --json report.json  # every record as JSON ('-': stdout)
    python benchmarks/kernel_report.py --full              # one row per launch, not per kernel and dtype
    python benchmarks/kernel_report.py --no-cuda           # skip the nvcc part (csrc/)

Triton kernels: every registered entry's cases call OUR launchers on empty CPU tensors of the real
shapes; each launch `kernel[grid](...)` is intercepted (JITFunction.run), its arguments bound the
way Triton binds them for a launch (same specialization: ints == 1 become constants, multiples of
16 are marked divisible), and compiled with `triton.compile` for the target (ttir -> ttgir -> ptx
-> cubin, Triton's bundled ptxas). So the tiles, warps, stages and grids are the ones our
launchers pick on a GPU. From each compile: registers and spill bytes (ptxas -v of that compile),
dynamic shared memory (Triton's metadata), how each tl.dot was lowered (TTGIR: wgmma, mma.sync or
FMA), and SASS instruction counts (cuobjdump: HGMMA = wgmma, HMMA = mma.sync, FFMA, LDL/STL =
local memory). Waves: `progs/SM` = programs / 132 SMs (H100 SXM, H200); `CTA/SM` = resident
programs per SM from registers, shared memory and threads; `fill` = programs / (132 x CTA/SM).

CUDA kernels (csrc/cuda/*.cu): nvcc compiles the device code alone for sm_90 with torch's headers
and flags, `--resource-usage` (ptxas -v) gives registers / spills / shared memory; cuobjdump's
SASS counts the double-precision instructions (DFMA, DMUL, DADD, MUFU.RCP64H).

Registry: a KernelEntry names a module of Triton kernels and a function returning its Cases for a
set ("production", "ci"); another file adds its kernels with one `register(...)` line in the
"Entries" section below, pointing at a cases function next to its kernels
("package.module:function"), without touching the loop. `--strict` fails (exit 1) on a spill or
local memory in a production case, a failed compile, a kernel of the module the cases never
launch, or fewer programs per SM than the entry asks for.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

# Run as a script, the report compiles real kernels: TRITON_INTERPRET must go before triton is
# imported. Imported as a module (the tests read its parsers and registry), it leaves the
# environment alone: the importing process may be running kernels in the interpreter.
if __name__ == "__main__" and os.environ.pop("TRITON_INTERPRET", None) not in (None, "0"):
    print("kernel_report: TRITON_INTERPRET removed for this process (it compiles real kernels)", file=sys.stderr)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sm_90 (H100 SXM / H200) limits for the occupancy estimate.
NUM_SMS = 132
REGS_PER_SM = 65536
REG_UNIT_PER_WARP = 256
SMEM_PER_SM = 233472
SMEM_RESERVED_PER_CTA = 1024
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass
class Case:
    """One shape of a kernel entry: `call(module)` runs the module's launchers on it."""

    shape: str                      # printed, e.g. "B128 N196 r16 D768 Dv768"
    dtype: str                      # printed, e.g. "bf16", "fp32-tf32"
    call: Callable                  # call(module) -> None
    production: bool = True         # spills here fail --strict


@dataclasses.dataclass
class KernelEntry:
    """A module of Triton kernels and how to compile them: `cases(set_name) -> [Case]`."""

    name: str
    module: str                     # import path of the module holding the @triton.jit kernels
    cases: Callable | str           # a function, or "package.module:function"
    min_programs_per_sm: dict = dataclasses.field(default_factory=dict)  # kernel name -> programs / 132 wanted in production cases


ENTRIES: list[KernelEntry] = []


def register(entry: KernelEntry) -> KernelEntry:
    ENTRIES.append(entry)
    return entry


def _resolve(cases):
    if callable(cases):
        return cases
    module, _, fn = cases.partition(":")
    return getattr(importlib.import_module(module), fn)


# ----------------------------------------------------------------------------- the factorization's cases

_PRODUCTION_WIDTHS = [(196, 384), (196, 512), (196, 768), (196, 1024), (256, 1280)]  # (N, D = Dv)
_DTYPES = {"bf16": ("bfloat16", False), "fp16": ("float16", False), "fp32-tf32": ("float32", True),
           "fp32-ieee": ("float32", False)}


def _factorization_case(B, N, R, D, DV, dtype_name, write_l=True, has_dl=True, production=True):
    torch_name, tf32 = _DTYPES[dtype_name]

    def call(mod):
        import torch

        dt = getattr(torch, torch_name)
        dense, sq, sv = torch.empty(B, N, D, dtype=dt), torch.empty(B, R, D, dtype=dt), torch.empty(B, R, DV, dtype=dt)
        dZ = torch.empty(B, N, DV, dtype=dt)
        dL = torch.empty(B, N, R, dtype=dt) if has_dl else None
        logits, inv_n, inv_k = torch.empty(B, N, R), torch.empty(B, N), torch.empty(B, R)
        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            mod.factorize_forward(dense, sq, sv, 0.06, 1e-7, write_l)
            mod.factorize_backward(dZ, dL, dense, sq, sv, logits, inv_n, inv_k, 0.06, 1e-7)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was

    variant = "" if (write_l and has_dl) else f" {'L' if write_l else 'noL'}/{'dL' if has_dl else 'nodL'}"
    shape = f"B{B} N{N} r{R} D{D}" + (f" Dv{DV}" if DV != D else "") + variant
    return Case(shape=shape, dtype=dtype_name, call=call, production=production)


def factorization_cases(which: str) -> list:
    """production: every dtype (fp32 with and without TF32) x r 1, 7, 16, 24, 32 x (N, D = Dv) of
    ViT-S..H (B 128), plus Dv 512 (the decoder's out_proj) and the no-L / no-dL variants; then r 64,
    r 128 and D 100 (not production: spills there are reported, not failed).
    ci: every dtype at r 16 for every D, and r 1 / 32 at D 768 (the distinct compiles of the
    production set but the r 7 / 24 alignments and the variants; tests/test_kernel_report.py)."""
    B = 128
    cases = []
    if which == "ci":
        for dt in _DTYPES:
            cases += [_factorization_case(B, N, 16, D, D, dt) for N, D in _PRODUCTION_WIDTHS]
            cases += [_factorization_case(B, 196, r, 768, 768, dt) for r in (1, 32)]
        return cases
    if which.startswith("shape="):  # shape=DTYPE:B,N,R,D,DV (one case, for experiments)
        dtype, _, sizes = which[len("shape="):].partition(":")
        B, N, R, D, DV = (int(v) for v in sizes.split(","))
        return [_factorization_case(B, N, R, D, DV, dtype)]
    if which != "production":
        raise ValueError(f"unknown case set {which!r} (production, ci, shape=DTYPE:B,N,R,D,DV)")
    for dt in _DTYPES:
        for r in (1, 7, 16, 24, 32):
            cases += [_factorization_case(B, N, r, D, D, dt) for N, D in _PRODUCTION_WIDTHS]
        cases.append(_factorization_case(B, 196, 16, 768, 512, dt))
        cases.append(_factorization_case(B, 196, 16, 768, 768, dt, write_l=False, has_dl=False))
        for r in (64, 128):
            cases.append(_factorization_case(B, 196, r, 768, 768, dt, production=False))
        cases.append(_factorization_case(B, 196, 16, 100, 100, dt, production=False))
    return cases


# ----------------------------------------------------------------------------- Entries (add yours here)
# One register(...) per module of Triton kernels; its cases function may live next to the kernels.

register(KernelEntry(
    name="factorization",
    module="stellar.kernels.factorize_triton",
    cases=factorization_cases,
    # the keys' kernel is one program per image over [r, D]: too small to need waves
    min_programs_per_sm={"_fwd_kernel": 1.9, "_bwd_rows_kernel": 1.9, "_bwd_dense_kernel": 1.9,
                         "_bwd_values_kernel": 1.9},
))
register(KernelEntry(
    name="prototype_ce",
    module="stellar.kernels.prototype_ce_triton",
    cases="stellar.kernels.prototype_ce_triton:compile_report_cases",
))


# ----------------------------------------------------------------------------- compiling Triton launches


@dataclasses.dataclass
class Record:
    entry: str
    kernel: str
    shape: str
    dtype: str
    production: bool
    grid: tuple = ()
    programs: int = 0
    blocks: dict = dataclasses.field(default_factory=dict)
    variant: dict = dataclasses.field(default_factory=dict)
    num_warps: int = 0
    num_stages: int = 0
    shared: int = -1
    regs: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    dots: dict = dataclasses.field(default_factory=dict)
    sass: dict = dataclasses.field(default_factory=dict)
    ctas_per_sm: int = 0
    programs_per_sm: float = 0.0
    fill: float = 0.0
    notes: list = dataclasses.field(default_factory=list)
    flags: list = dataclasses.field(default_factory=list)
    error: str = ""
    binary: str = ""


_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_x]+)*)")
SASS_COUNTED = ("HGMMA", "HMMA", "FFMA", "LDL", "STL", "DFMA", "DMUL", "DADD", "MUFU.RCP64H")


def _is_tl_sum(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sum"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl")


def thread_local_hazards(source: str, filename: str = "<kernel>") -> list[str]:
    """Loop accumulators `acc += tl.sum(x, axis)` (or `acc = acc + tl.sum(...)`) that the same loop
    also reads elsewhere: "file:line: name".

    Triton's TritonGPUOptimizeThreadLocality pass keeps such an accumulator as per-thread
    partials, reduced after the loop; a read inside the loop then gets a wrong value. Seen on the
    H200 (triton 3.6) in the prototype CE forward, whose `tdot + tsum * shift` compiled, in the
    sm_90 TTGIR of triton 3.8 too, to `shift * <the zeros tsum started from>`: the loss was 6 %
    low. The interpreter runs the Python as written, so only a compile shows it; this reads the
    source instead (no GPU, no compile)."""
    found = []
    for loop in (n for n in ast.walk(ast.parse(source, filename)) if isinstance(n, ast.For)):
        accumulators = {}
        for node in ast.walk(loop):
            if (isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add)
                    and isinstance(node.target, ast.Name) and _is_tl_sum(node.value)):
                accumulators[node.target.id] = 0       # the target is a Store: no read of its own
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                  and isinstance(node.value, ast.BinOp) and isinstance(node.value.op, ast.Add)):
                name, sides = node.targets[0].id, (node.value.left, node.value.right)
                if any(isinstance(a, ast.Name) and a.id == name for a in sides) and any(_is_tl_sum(b) for b in sides):
                    accumulators[name] = 1             # `acc = acc + tl.sum(...)` reads acc once
        for name, own in accumulators.items():
            reads = [n for n in ast.walk(loop) if isinstance(n, ast.Name) and n.id == name
                     and isinstance(n.ctx, ast.Load)]
            if len(reads) > own:
                found.append(f"{filename}:{min(n.lineno for n in reads)}: {name}")
    return found


def count_sass(sass: str) -> dict:
    """Counts of the opcodes in SASS_COUNTED in a SASS listing (static instructions, not executed ones)."""
    counts = dict.fromkeys(SASS_COUNTED, 0)
    for m in _SASS_OP.finditer(sass):
        op, mods = m.group(1), m.group(2)
        if op in counts:
            counts[op] += 1
        if op == "MUFU" and mods.startswith(".RCP64H"):
            counts["MUFU.RCP64H"] += 1
    return counts


def sass_counts(cuobjdump: str, cubin_path: str) -> dict:
    """count_sass of a cubin's SASS."""
    return count_sass(subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True, text=True, timeout=300).stdout)


def parse_ptxas(log: str) -> dict:
    """{regs, stack, spill_stores, spill_loads, smem, notes} of one kernel's ptxas -v log."""
    out = dict(regs=-1, stack=-1, spill_stores=-1, spill_loads=-1, smem=0, notes=[])
    m = _PTXAS_SPILL.search(log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    m = _PTXAS_REGS.search(log)
    if m:
        out["regs"] = int(m.group(1))
    m = _PTXAS_SMEM.search(log)
    if m:
        out["smem"] = int(m.group(1))
    out["notes"] = sorted({line.strip() for line in log.splitlines() if "warning" in line.lower() or "(C7" in line})
    return out


def dot_lowering(ttgir: str) -> dict:
    """How each tl.dot was lowered: wgmma (ttng.warp_group_dot), mma.sync (tt.dot into an
    nvidia_mma layout of version 2) or FMA (tt.dot into a blocked layout)."""
    versions = {m.group(1): int(m.group(2)) for m in
                re.finditer(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", ttgir, re.M)}
    dots = {"wgmma": 0, "mma": 0, "fma": 0}
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            dots["wgmma"] += 1
        elif re.search(r"= tt\.dot ", line):
            layout = re.search(r"->\s*tensor<[^,>]*,\s*(#\w+)>", line)
            name = layout.group(1) if layout else ""
            dots["mma" if versions.get(name) == 2 else "wgmma" if versions.get(name) == 3 else "fma"] += 1
    return {k: v for k, v in dots.items() if v}


def occupancy(regs: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM on sm_90 (registers, shared memory, threads, the 32-CTA cap)."""
    if regs <= 0 or num_warps <= 0:
        return 0
    per_warp = -(-regs * 32 // REG_UNIT_PER_WARP) * REG_UNIT_PER_WARP
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SMEM_PER_SM // (max(shared, 0) + SMEM_RESERVED_PER_CTA)
    by_threads = MAX_THREADS_PER_SM // (num_warps * 32)
    return min(by_regs, by_smem, by_threads, MAX_CTAS_PER_SM)


class TritonCompiler:
    """Intercepts `kernel[grid](...)` launches and compiles them for `arch` instead."""

    def __init__(self, arch: int, workdir: str):
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource, make_backend

        self.triton, self.knobs, self.ASTSource = triton, knobs, ASTSource
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.ptxas = knobs.nvidia.ptxas.path
        self.cuobjdump = knobs.nvidia.cuobjdump.path
        if hasattr(knobs.nvidia, "dump_ptxas_log"):
            knobs.nvidia.dump_ptxas_log = True  # the compile's own ptxas -v log, printed to stdout
        self.workdir = workdir
        self.by_hash: dict = {}
        self.records: list = []
        self.launched: set = set()
        self.current = None  # (entry name, Case)

    @contextlib.contextmanager
    def intercepting(self):
        from triton.runtime.jit import JITFunction

        original = JITFunction.run
        compiler = self

        def run(jit, *args, grid, warmup, **kwargs):
            return compiler.compile_launch(jit, grid, args, kwargs)

        JITFunction.run = run
        try:
            yield
        finally:
            JITFunction.run = original

    def _bind(self, jit, args, kwargs):
        """The launch's arguments to compile() inputs, as JITFunction.run does it."""
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", jit.debug) or self.knobs.runtime.debug
        option_fields = self.backend.parse_options({}).__dict__
        mode = getattr(self.knobs.compilation, "instrumentation_mode", None)
        if mode is not None and "instrumentation_mode" in option_fields:
            kwargs["instrumentation_mode"] = mode
        binder = create_function_from_signature(jit.signature, jit.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound_args, specialization, options)
        return options, signature, constexprs, attrs

    def compile_launch(self, jit, grid, args, kwargs):
        entry, case = self.current
        name = jit.__name__ if hasattr(jit, "__name__") else jit.fn.__name__
        self.launched.add((jit.fn.__module__, name))
        grid = tuple(grid(kwargs)) if callable(grid) else tuple(grid)
        rec = Record(entry=entry, kernel=name, shape=case.shape, dtype=case.dtype, production=case.production,
                     grid=grid, blocks={k: v for k, v in kwargs.items() if k.startswith("BLOCK_")},
                     variant={k: v for k, v in kwargs.items() if k in ("WRITE_L", "HAS_DL")})
        rec.programs = 1
        for g in grid:
            rec.programs *= int(g)
        self.records.append(rec)
        try:
            options, signature, constexprs, attrs = self._bind(jit, args, kwargs)
            src = self.ASTSource(jit, signature, constexprs, attrs)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                ck = self.triton.compile(src, target=self.target, options=options.__dict__)
        except Exception as e:  # noqa: BLE001  a failed compile is a row of the report, not a crash
            cause = f" (caused by {type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
            rec.error = f"{type(e).__name__}: {str(e)[-1500:]}{cause}"
            rec.flags.append("COMPILE-FAIL")
            return None
        md = ck.metadata
        rec.num_warps, rec.num_stages, rec.shared = md.num_warps, md.num_stages, md.shared
        rec.binary = ck.hash
        if ck.hash not in self.by_hash:
            self.by_hash[ck.hash] = self._analyse(ck, out.getvalue())
        info = self.by_hash[ck.hash]
        for k in ("regs", "stack", "spill_stores", "spill_loads", "notes", "dots", "sass"):
            setattr(rec, k, info[k])
        rec.ctas_per_sm = occupancy(rec.regs, rec.shared, rec.num_warps)
        rec.programs_per_sm = rec.programs / NUM_SMS
        rec.fill = rec.programs / (NUM_SMS * rec.ctas_per_sm) if rec.ctas_per_sm else 0.0
        return None

    def _analyse(self, ck, log: str) -> dict:
        path = os.path.join(self.workdir, f"{ck.hash}.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        if "Used" not in log:  # a Triton cache hit, or a Triton without the log knob: ask ptxas again
            log = self._ptxas_log(ck.asm["ptx"])
        info = parse_ptxas(log)
        info["dots"] = dot_lowering(ck.asm["ttgir"])
        info["sass"] = sass_counts(self.cuobjdump, path)
        return info

    def _ptxas_log(self, ptx: str) -> str:
        path = os.path.join(self.workdir, "again.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = f"sm_{self.target.arch}{'a' if self.target.arch >= 90 else ''}"
        run = subprocess.run([self.ptxas, "-v", "-lineinfo", f"--gpu-name={arch}", path, "-o", path + ".o"],
                             capture_output=True, text=True)
        return run.stdout + run.stderr


def _compile_cases(entry_index: int, which: str, indices: list, arch: int, verbose: bool) -> tuple:
    """Compile the launches of the cases `indices` of ENTRIES[entry_index] (in this process)."""
    entry = ENTRIES[entry_index]
    module = importlib.import_module(entry.module)
    cases = _resolve(entry.cases)(which)
    workdir = tempfile.mkdtemp(prefix="kernel_report_")
    compiler = TritonCompiler(arch, workdir)
    problems = []
    t0 = time.perf_counter()
    try:
        with compiler.intercepting():
            for n, i in enumerate(indices):
                case = cases[i]
                compiler.current = (entry.name, case)
                try:
                    case.call(module)
                except Exception as e:  # noqa: BLE001  the launcher itself failed: reported
                    problems.append(f"{entry.name} {case.dtype} {case.shape}: launcher raised {type(e).__name__}: {e}")
                if verbose:
                    print(f"  [{os.getpid()}] {n + 1}/{len(indices)} {entry.name} {case.dtype} {case.shape}: "
                          f"{len(compiler.by_hash)} binaries, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [dataclasses.asdict(r) for r in compiler.records], problems, sorted(compiler.launched)


def _compile_job(job):
    return _compile_cases(*job)


def run_triton(entries, which: str, arch: int, verbose: bool, jobs: int = 1) -> tuple[list, list]:
    """Compile every case of every entry, over `jobs` processes; (records, problems)."""
    import multiprocessing

    import triton

    cache = tempfile.mkdtemp(prefix="kernel_report_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every kernel really compiles (ptxas log included)
    work, problems, modules = [], [], {}
    for entry in entries:
        index = ENTRIES.index(entry)
        try:
            count = len(_resolve(entry.cases)(which))
        except ValueError as e:
            problems.append(f"{entry.name}: {e}")
            continue
        modules[entry.name] = importlib.import_module(entry.module)
        chunk = max(1, -(-count // max(1, jobs)))  # contiguous: a chunk shares its dtype's binaries
        work += [(index, which, list(range(lo, min(lo + chunk, count))), arch, verbose) for lo in range(0, count, chunk)]
    try:
        if jobs > 1 and len(work) > 1:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(work))) as pool:
                results = pool.map(_compile_job, work, chunksize=1)
        else:
            results = [_compile_job(job) for job in work]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    records, launched = [], set()
    for recs, probs, seen in results:
        records += [Record(**{**r, "grid": tuple(r["grid"])}) for r in recs]
        problems += probs
        launched |= {tuple(x) for x in seen}
    for entry in entries:
        module = modules.get(entry.name)
        if module is None:
            continue
        kernels = sorted(n for n, obj in vars(module).items()
                         if isinstance(obj, triton.runtime.jit.JITFunction) and n.endswith("_kernel"))
        for n in kernels:
            if (module.__name__, n) not in launched:
                problems.append(f"{entry.name}: {entry.module}.{n} was never launched by the cases: not compiled")
        for rec in records:
            if rec.entry != entry.name:
                continue
            if rec.spill_stores > 0 or rec.spill_loads > 0 or rec.stack > 0 or rec.sass.get("LDL") or rec.sass.get("STL"):
                rec.flags.append("SPILL")
            if rec.dots.get("fma"):
                rec.flags.append("FMA-DOT")
            if any("wgmma" in n.lower() and "serializ" in n.lower() for n in rec.notes):
                rec.flags.append("WGMMA-SERIAL")
            wanted = entry.min_programs_per_sm.get(rec.kernel)
            if rec.production and wanted and rec.programs_per_sm < wanted:
                rec.flags.append("FEW-PROGRAMS")
    return records, problems


# ----------------------------------------------------------------------------- nvcc for csrc/


def _cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    # as setup.py: a toolkit has bin/nvcc and include/cuda_runtime.h (not a wrapper in /usr/local/bin)
    return next((h for h in candidates if os.path.isfile(os.path.join(h, "bin", "nvcc"))
                 and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))), None)


def nvcc_command(source: str, out: str, arch: int, cuda_home: str) -> list:
    """nvcc for the device code of one .cu alone, with the headers and defines torch's
    cpp_extension builds it with (setup.py), plus --resource-usage."""
    os.environ.setdefault("CUDA_HOME", cuda_home)  # read by cpp_extension at import
    import torch
    import torch.utils.cpp_extension as ce

    try:
        includes = ce.include_paths("cuda")
    except TypeError:  # older torch: include_paths(cuda: bool)
        includes = ce.include_paths(True)
    site = os.path.dirname(os.path.dirname(torch.__file__))
    includes += [os.path.join(cuda_home, "include")] + sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return ([os.path.join(cuda_home, "bin", "nvcc"), "--cubin", f"-arch=sm_{arch}", "-std=c++20", "-O3",
             *ce.COMMON_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-DSTELLAR_WITH_CUDA=1", f"-I{os.path.join(ROOT, 'csrc')}"]
            + [f"-I{i}" for i in includes] + ["--resource-usage", source, "-o", out])


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if filt:
        name = subprocess.run([filt], input=name, capture_output=True, text=True).stdout.strip() or name
    name = re.sub(r"stellar::\(anonymous namespace\)::", "", name)
    return re.sub(r"\(.*\)$", "", name).replace("void ", "")


def run_nvcc(arch: int, verbose: bool) -> tuple[list, list]:
    """[{kernel, source, regs, stack, spill_stores, spill_loads, smem, sass}], problems."""
    home = _cuda_home()
    if home is None:
        return [], ["nvcc: no CUDA toolkit found (CUDA_HOME): the csrc/ kernels were not compiled"]
    from triton import knobs

    cuobjdump = os.path.join(home, "bin", "cuobjdump")
    cuobjdump = cuobjdump if os.path.isfile(cuobjdump) else knobs.nvidia.cuobjdump.path
    records, problems = [], []
    workdir = tempfile.mkdtemp(prefix="kernel_report_nvcc_")
    try:
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
            cubin = os.path.join(workdir, os.path.basename(source) + ".cubin")
            cmd = nvcc_command(source, cubin, arch, home)
            if verbose:
                print("  " + " ".join(cmd), file=sys.stderr, flush=True)
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                problems.append(f"nvcc failed on {os.path.relpath(source, ROOT)}:\n{(run.stdout + run.stderr)[-3000:]}")
                continue
            blocks = re.split(r"ptxas info\s*: Compiling entry function '", run.stdout + run.stderr)[1:]
            sass = _sass_by_function(cuobjdump, cubin)
            for block in blocks:
                mangled = block.split("'", 1)[0]
                info = parse_ptxas(block)
                records.append(dict(kernel=_demangle(mangled), source=os.path.relpath(source, ROOT),
                                    regs=info["regs"], stack=info["stack"], spill_stores=info["spill_stores"],
                                    spill_loads=info["spill_loads"], smem=info["smem"], notes=info["notes"],
                                    sass=sass.get(mangled, {})))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return records, problems


def _sass_by_function(cuobjdump: str, cubin: str) -> dict:
    out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    return {part.split("\n", 1)[0].strip(): count_sass(part) for part in re.split(r"\n\s*Function : ", out)[1:]}


# ----------------------------------------------------------------------------- printing


def _table(header: list, rows: list) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def _short(kernel: str) -> str:
    return kernel.strip("_").removesuffix("_kernel")


def triton_table(records: list) -> str:
    """One row per (entry, kernel, dtype, shape); the tiles are BLOCK_N/BLOCK_R/BLOCK_D(V) as
    launched, then warps x stages."""
    header = ["kernel", "dtype", "shape", "tiles N/R/C w s", "regs", "spill st/ld B", "smem KB",
              "dots", "HGMMA/HMMA/FFMA", "progs", "progs/SM", "CTA/SM", "flags"]
    rows = []
    for r in records:
        if r.error:
            rows.append([f"{r.entry}.{_short(r.kernel)}", r.dtype, r.shape, "", "", "", "", "", "", r.programs, "", "",
                         "COMPILE-FAIL"])
            continue
        b = r.blocks
        cols = b.get("BLOCK_D", b.get("BLOCK_DV", ""))
        tiles = "/".join(str(b[k]) for k in ("BLOCK_N", "BLOCK_R") if k in b) + (f"/{cols}" if cols != "" else "")
        dots = " ".join(f"{v} {k}" for k, v in r.dots.items()) or "-"
        s = r.sass
        rows.append([f"{r.entry}.{_short(r.kernel)}", r.dtype, r.shape, f"{tiles} {r.num_warps}x{r.num_stages}",
                     r.regs, f"{r.spill_stores}/{r.spill_loads}", f"{r.shared / 1024:.0f}", dots,
                     f"{s.get('HGMMA', 0)}/{s.get('HMMA', 0)}/{s.get('FFMA', 0)}", r.programs,
                     f"{r.programs_per_sm:.1f}", r.ctas_per_sm, ",".join(r.flags) or "ok"])
    return _table(header, rows)


def summary_table(records: list) -> str:
    """One row per (entry, kernel, dtype) over its production cases: the worst registers, spills
    and shared memory, every dot lowering seen, the fewest programs per SM; the non-production
    cases (r 64 / 128, D 100) in rows of their own."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r.entry, r.kernel, r.dtype, r.production), []).append(r)
    header = ["kernel", "dtype", "cases", "regs max", "spill st/ld B max", "smem KB max", "dots",
              "progs/SM min", "CTA/SM min", "flags"]
    rows = []
    for (entry, kernel, dtype, production), recs in groups.items():
        ok = [r for r in recs if not r.error]
        dots = sorted({k for r in ok for k in r.dots})
        flags = sorted({f for r in recs for f in r.flags})
        rows.append([f"{entry}.{_short(kernel)}", dtype, f"{len(recs)}" + ("" if production else " (not production)"),
                     max((r.regs for r in ok), default=""),
                     f"{max((r.spill_stores for r in ok), default=0)}/{max((r.spill_loads for r in ok), default=0)}",
                     f"{max((r.shared for r in ok), default=0) / 1024:.0f}", " ".join(dots) or "-",
                     f"{min((r.programs_per_sm for r in ok), default=0):.1f}", min((r.ctas_per_sm for r in ok), default=""),
                     ",".join(flags) or "ok"])
    return _table(header, rows)


def cuda_table(records: list) -> str:
    header = ["kernel", "source", "regs", "spill st/ld B", "stack B", "smem B", "DFMA/DMUL/DADD/RCP64H", "FFMA"]
    rows = [[r["kernel"], r["source"], r["regs"], f"{r['spill_stores']}/{r['spill_loads']}", r["stack"], r["smem"],
             "/".join(str(r["sass"].get(k, 0)) for k in ("DFMA", "DMUL", "DADD", "MUFU.RCP64H")),
             r["sass"].get("FFMA", 0)] for r in records]
    return _table(header, rows)


def _versions(arch: int) -> str:
    import torch
    import triton
    from triton import knobs

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "kernels", "csrc"],
                           capture_output=True, text=True).stdout.strip()
    ptxas = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
    ptxas = re.search(r"release ([\d.]+)", ptxas)
    return (f"target sm_{arch} ({NUM_SMS} SMs assumed), triton {triton.__version__} (ptxas "
            f"{ptxas.group(1) if ptxas else '?'}), torch {torch.__version__}, commit {commit or '?'}"
            f"{' + uncommitted changes' if dirty else ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="production",
                    help="case set: production (default), ci, or an entry's own (factorization: shape=fp32-ieee:128,196,32,768,768)")
    ap.add_argument("--entry", action="append", default=None, help="only these registered entries (repeatable)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write every record as JSON ('-': stdout, no table)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc report of csrc/cuda")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 on a spill in a production case, a failed compile, an unlaunched kernel or too few programs")
    ap.add_argument("--full", action="store_true", help="one row per launch (default: one per kernel and dtype)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    sys.path.insert(0, ROOT)
    if _cuda_home():  # before anything imports torch.utils.cpp_extension, which reads it once
        os.environ.setdefault("CUDA_HOME", _cuda_home())
    entries = [e for e in ENTRIES if args.entry is None or e.name in args.entry]
    records, problems = run_triton(entries, args.set, args.arch, args.verbose, args.jobs)
    cuda_records = []
    if not args.no_cuda:
        cuda_records, cuda_problems = run_nvcc(args.arch, args.verbose)
        problems += cuda_problems
    bad = [r for r in records if r.error or "FEW-PROGRAMS" in r.flags or (r.production and "SPILL" in r.flags)]
    bad_cuda = [r for r in cuda_records if r["spill_stores"] > 0 or r["spill_loads"] > 0 or r["stack"] > 0]
    summary = (f"{len(records)} Triton launches ({len(set(r.binary for r in records if r.binary))} distinct binaries), "
               f"{sum('SPILL' in r.flags for r in records)} with spills ({sum(r.production and 'SPILL' in r.flags for r in records)} "
               f"at production shapes), {sum(bool(r.error) for r in records)} failed; {len(cuda_records)} CUDA kernels, "
               f"{len(bad_cuda)} with spills; {time.perf_counter() - t0:.0f} s")
    if args.json:
        data = dict(versions=_versions(args.arch), set=args.set, triton=[dataclasses.asdict(r) for r in records],
                    cuda=cuda_records, problems=problems, summary=summary)
        if args.json == "-":
            json.dump(data, sys.stdout, indent=1, default=str)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1, default=str)
    if args.json != "-":
        print(f"Compile report ({args.set} shapes): {_versions(args.arch)}")
        print("Compile-time figures, not timings. dots: how each tl.dot was lowered (wgmma, mma = mma.sync, fma); "
              "HGMMA/HMMA = wgmma/mma.sync in SASS (static counts); progs/SM = programs / 132; CTA/SM = resident "
              "programs per SM (estimate).\n")
        print(triton_table(records) if args.full else summary_table(records))
        if cuda_records:
            print("\nCUDA kernels (nvcc --resource-usage, sm_%d):\n" % args.arch)
            print(cuda_table(cuda_records))
        for p in problems:
            print(f"\nPROBLEM: {p}")
        for r in records:
            if r.error:
                print(f"\nCOMPILE-FAIL {r.entry}.{r.kernel} {r.dtype} {r.shape}: {r.error}")
        print("\n" + summary)
    failed = bool(bad or bad_cuda or problems)
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
