"""Compile every kernel variant of bench/gpu_warm.py through CuPy's own NVRTC path, on a machine
without a GPU: the compiler, options and include folders a GPU run will use, so that a source
NVRTC rejects costs no device minutes.

CuPy asks the GPU for its architecture before it compiles; here it is told (--arch), and the
compiled cubin is caught where CuPy would load it onto a device.  Each variant is listed with
its registers, spills and NVRTC's warnings; the exit status is 1 if one failed.  Needs CuPy and
NVRTC from pip, no driver (never a dependency of lkref; a scratch environment does):

    python -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install numpy cupy-cuda13x nvidia-cuda-nvrtc
    /tmp/nvrtc/bin/python bench/nvrtc_check.py [--arch 90 --arch 80] [--workers N]

sm_90 builds the variants of a GPU with clusters, an earlier arch those of one without (a row's
blocks meet in global memory), their target caches sized to that arch's shared memory.

--cache DIR writes each cubin into CuPy's kernel cache at DIR instead, compiled with lkref's
own options (so without ptxas's register counts), for a GPU run to carry as .cupy-cache/
(bench/kernel_cache.py pack DIR .cupy-cache/NAME.tar.xz).  CuPy keys a kernel by its source,
its options (which name the include folders of the CuPy and the CUDA headers it found, full
paths), NVRTC's version and CuPy's build, so a cache built here is found on the device only
where all of those match: built in an environment at the device's own path with its versions
(bench/README.md, "A kernel cache built before the run").  A miss costs nothing but the
unpacking; the warm-up's per-variant seconds and the pack line ("N of the M unpacked read
again") say whether it was found.

This leans on private parts of cupy.cuda.compiler (_get_arch, _get_arch_for_options_for_nvrtc,
_compile_using_nvrtc_no_warning and its module `function`; written against CuPy 14.2): a CuPy
that renames them fails here, loudly."""

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


#: this process's CuPy as _offline left it: the arch it compiles for (None: not yet made
#: offline), and the NVRTC options of its last compile (None where CuPy's cache held the kernel)
_SEEN = {"arch": None, "options": None}


def _offline(arch):
    """Make this process's CuPy compile for sm_<arch> without asking a GPU, and stop where it would
    load the cubin onto one (after writing it into the kernel cache, where that is on)."""
    import types

    from cupy.cuda import compiler

    if _SEEN["arch"] == arch:                            # a worker process's later variants
        return
    _SEEN["arch"] = arch
    compiler._get_arch = lambda: arch
    compiler._get_arch_for_options_for_nvrtc = lambda a=None: (f"-arch=sm_{a or arch}", "cubin")
    nvrtc = compiler._compile_using_nvrtc_no_warning

    def compiled(source, options, *args, **kwargs):
        _SEEN["options"] = options
        return nvrtc(source, options, *args, **kwargs)

    class Unloaded:
        """Stands in for cupy.cuda.function.Module, which would load the cubin onto a GPU."""

        def _set_mapping(self, mapping):
            pass

        def load(self, cubin):
            raise _Compiled(_SEEN["options"], len(cubin))

    compiler._compile_using_nvrtc_no_warning = compiled
    compiler.function = types.SimpleNamespace(Module=Unloaded)


def compile_one(arch, spec, cache=False):
    """Compile one variant as lkref builds it (gpu_warm.source), through cupy's compile_with_cache
    as cupy.RawKernel calls it; (seconds, registers, spill bytes, warnings, options) or the error.
    cache: into CuPy's kernel cache (CUPY_CACHE_DIR) with lkref's own options, so without ptxas's
    counts (registers and spills -1; options None where the cache held it already)."""
    if cache:
        os.environ.pop("CUPY_CACHE_IN_MEMORY", None)
    else:
        os.environ["CUPY_CACHE_IN_MEMORY"] = "1"        # compile every time, write nothing
    _offline(arch)
    from cupy._core import core

    if spec.optin is None:                               # the target cache as this arch's GPU sizes it
        spec = spec._replace(optin=SMEM_KIB[int(arch)][1] * 1024)
    src = gpu_warm.source(spec)
    log = io.StringIO()
    _SEEN["options"] = None
    t0 = time.perf_counter()
    try:
        core.compile_with_cache(src, OPTIONS + (() if cache else ("--ptxas-options=-v",)), prepend_cupy_headers=False,
                                log_stream=log)
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
    ap.add_argument("--cache", metavar="DIR", help="write the cubins into CuPy's kernel cache at DIR (the docstring)")
    args = ap.parse_args(argv)
    if args.cache:                                       # the worker processes inherit it
        os.environ["CUPY_CACHE_DIR"] = os.path.abspath(args.cache)
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
              f"compile_with_cache, NVRTC {version}, {args.workers} processes"
              + (f", into the kernel cache at {os.environ['CUPY_CACHE_DIR']}" if args.cache else ""))
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(compile_one, [arch] * len(specs), specs, [bool(args.cache)] * len(specs)))
        for spec, res in zip(specs, results):
            if isinstance(res, str):
                failed += 1
                print(f"  FAILED  {gpu_warm.describe(spec)}: {res[:2000]}")
                continue
            seconds, regs, spill, warnings, _ = res
            print(f"  {seconds:5.1f} s  regs {regs:3d}  spill {spill:3d} B  {gpu_warm.describe(spec)}"
                  + "".join(f"\n      {w}" for w in warnings))
        options = next((r[4] for r in results if not isinstance(r, str) and r[4] is not None), ())
        print(f"# sm_{arch}: {sum(isinstance(r, str) for r in results)} of {len(specs)} failed, "
              f"{sum(len(r[3]) for r in results if not isinstance(r, str))} warnings, most registers "
              f"{max((r[1] for r in results if not isinstance(r, str)), default=0)}, spills in "
              f"{sum(r[2] > 0 for r in results if not isinstance(r, str))}, "
              f"{time.perf_counter() - t0:.0f} s; NVRTC options: "
              + " ".join(o if not o.startswith("-I") else "-I" + o.split("/site-packages/")[-1] for o in options))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
