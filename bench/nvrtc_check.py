"""Compile every kernel variant of bench/gpu_warm.py through CuPy's own NVRTC path, on a machine
without a GPU: the compiler, options and include folders a GPU run will use, so that a source
NVRTC rejects costs no device minutes.

CuPy asks the GPU for its architecture before it compiles; here it is told (--arch), and the
compiled cubin is caught before CuPy would load it onto a device.  Each variant is listed with
its registers, spills and NVRTC's warnings; the exit status is 1 if one failed.  Needs CuPy and
NVRTC from pip, no driver (never a dependency of lkref; a scratch environment does):

    python -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install numpy cupy-cuda13x nvidia-cuda-nvrtc
    /tmp/nvrtc/bin/python bench/nvrtc_check.py [--arch 90 --arch 80] [--workers N]

sm_90 builds the variants of a GPU with clusters, an earlier arch those of one without (a row's
blocks meet in global memory), their target caches sized to that arch's shared memory.  This
leans on three private functions of cupy.cuda.compiler (_get_arch,
_get_arch_for_options_for_nvrtc and _compile_using_nvrtc_no_warning; written against CuPy
14.2): a CuPy that renames them fails here, loudly."""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_warm  # noqa: E402
from kernel_resources import SMEM_KIB, ptxas_counts  # noqa: E402

#: what lkref.fused_cupy._build passes to cupy.RawKernel (CuPy adds its include folders and -ftz=true)
OPTIONS = ("-std=c++17",)


class _Compiled(Exception):
    """Raised with the NVRTC options and cubin size where CuPy would load the cubin onto a GPU."""


def _offline(arch):
    """Make this process's CuPy compile for sm_<arch> without asking a GPU, and stop after NVRTC."""
    from cupy.cuda import compiler

    compiler._get_arch = lambda: arch
    compiler._get_arch_for_options_for_nvrtc = lambda a=None: (f"-arch=sm_{a or arch}", "cubin")
    nvrtc = compiler._compile_using_nvrtc_no_warning

    def caught(source, options, *args, **kwargs):
        cubin, _ = nvrtc(source, options, *args, **kwargs)
        raise _Compiled(options, len(cubin))

    compiler._compile_using_nvrtc_no_warning = caught


def compile_one(arch, spec):
    """Compile one variant as lkref builds it (gpu_warm.source), through cupy's compile_with_cache
    as cupy.RawKernel calls it; (seconds, registers, spill bytes, warnings, options) or the error."""
    os.environ["CUPY_CACHE_IN_MEMORY"] = "1"            # compile every time, write nothing
    _offline(arch)
    from cupy._core import core

    if spec.optin is None:                               # the target cache as this arch's GPU sizes it
        spec = spec._replace(optin=SMEM_KIB[int(arch)][1] * 1024)
    src = gpu_warm.source(spec)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        core.compile_with_cache(src, OPTIONS + ("--ptxas-options=-v",), prepend_cupy_headers=False, log_stream=log)
    except _Compiled as done:
        options = done.args[0]
    except Exception as exc:                              # NVRTC's message names the line
        return f"{type(exc).__name__}: {exc}"
    else:
        return "CuPy loaded a module: this CuPy is not the one nvrtc_check.py knows"
    text = log.getvalue()
    counts = ptxas_counts(text, missing=-1)
    warnings = [line for line in text.splitlines() if "warning" in line.lower()]
    return time.perf_counter() - t0, counts["regs"], counts["spill"], warnings, options


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="compute capability without the dot (default: 90 and 80)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        import cupy
        from cupy.cuda import nvrtc
    except ImportError as exc:
        sys.exit(f"CuPy is not importable ({exc}); see this script's docstring")
    version = ".".join(map(str, nvrtc.getVersion()))
    failed = 0
    for arch in args.arch or ["90", "80"]:
        if int(arch) not in SMEM_KIB:
            sys.exit(f"--arch {arch}: not in kernel_resources.SMEM_KIB {sorted(SMEM_KIB)}")
        specs = gpu_warm.variants(clusters=int(arch) >= 90)
        print(f"# sm_{arch}: {len(specs)} variants of bench/gpu_warm.py through cupy {cupy.__version__}'s "
              f"compile_with_cache, NVRTC {version}, {args.workers} processes")
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(compile_one, [arch] * len(specs), specs))
        for spec, res in zip(specs, results):
            if isinstance(res, str):
                failed += 1
                print(f"  FAILED  {gpu_warm.describe(spec)}: {res[:2000]}")
                continue
            seconds, regs, spill, warnings, _ = res
            print(f"  {seconds:5.1f} s  regs {regs:3d}  spill {spill:3d} B  {gpu_warm.describe(spec)}"
                  + "".join(f"\n      {w}" for w in warnings))
        options = next((r[4] for r in results if not isinstance(r, str)), ())
        print(f"# sm_{arch}: {sum(isinstance(r, str) for r in results)} of {len(specs)} failed, "
              f"{sum(len(r[3]) for r in results if not isinstance(r, str))} warnings, most registers "
              f"{max((r[1] for r in results if not isinstance(r, str)), default=0)}, spills in "
              f"{sum(r[2] > 0 for r in results if not isinstance(r, str))}, "
              f"{time.perf_counter() - t0:.0f} s; NVRTC options: "
              + " ".join(o if not o.startswith("-I") else "-I" + o.split("/site-packages/")[-1] for o in options))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
