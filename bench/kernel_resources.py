"""Registers, spills, shared memory and machine-code size of the CuPy kernel's variants, from nvcc's ptxas
(no GPU needed): python bench/kernel_resources.py [--arch sm_90]; the target cache is sized
to the arch's shared memory per block, as lkref sizes it on such a GPU.  Occupancy follows from
them: an SM has 65 536 registers and (SMEM_KIB) 228 KiB of shared memory on an H100, 164 KiB
on an A100.  Before sm_90 a row's blocks meet in global memory instead of a cluster."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lkref import fused_cupy  # noqa: E402
from lkref.benchmark import PIPE_SHAPES, TUNING_SHAPES  # noqa: E402


#: the options CuPy compiles a RawKernel with (it appends -ftz=true to the caller's)
CUPY_OPTIONS = ("-std=c++17", "-ftz=true")
#: shared memory per SM and the most one block may opt in to, KiB (CUDA's tables)
SMEM_KIB = {75: (64, 64), 80: (164, 163), 86: (100, 99), 87: (164, 163), 89: (100, 99), 90: (228, 227)}


def resources(V, threads, share, cache, arch, work, ctype="float", pairs=False, exp2=None, vec=None, phase=0, pipe=0,
              ahead=False, lead=False):
    """(items, cluster, target entries kept per thread, {regs, spill, smem} or None) of one
    variant as lkref builds it for `arch`: its target cache sized to the arch's shared memory;
    ctype: the C type of the logits, the target and the gradient; pairs: a 2-byte target copied
    in pairs (fused_cupy.PAIR_PREFETCH); exp2: fused_cupy.EXP2 (None: the default); vec: 4 adjacent
    columns a thread at a time (None: fused_cupy.VEC, as lkref takes it for rows aligned to 4
    entries with V % 4 == 0); phase: 0 (one launch), 2 (the gradient launch of a two-launch call);
    pipe: fused_cupy.PIPELINE's stages (0: none), whose rows keep the whole target share; ahead:
    fused_cupy.L2_AHEAD; lead: fused_cupy.L2_LEAD."""
    optin = _smem_kib(arch)[1] * 1024
    with fused_cupy.configured(threads=threads, block_share=share, cache_target=cache):
        items, cluster = fused_cupy.plan(V)
        cached = items if pipe else fused_cupy.cached_items(items, optin, _bytes(ctype), phase)
        src = fused_cupy.kernel_source(items, cluster, ctype, ctype, dsmem=_cc(arch) >= 90, cached=cached, p_t=ctype,
                                       pairs=pairs, mode=fused_cupy.MODES["lk_alpha"], phase=phase, exp2=exp2,
                                       vec=(fused_cupy.VEC if vec is None else vec) and V % 4 == 0, pipe=pipe,
                                       ahead=ahead, lead=lead)
    path = os.path.join(work, "k.cu")
    with open(path, "w") as f:
        f.write(src)
    r = subprocess.run(["nvcc", *CUPY_OPTIONS, f"-arch={arch}", "-cubin", "-Xptxas", "-v",
                        "-o", os.path.join(work, "k.cubin"), path], capture_output=True, text=True)
    if r.returncode != 0:
        return items, cluster, cached, None
    return items, cluster, cached, {**ptxas_counts(r.stderr), "sass": sass_bytes(os.path.join(work, "k.cubin")),
                                    "src": src}


def ptxas_counts(log, missing=0):
    """{regs, spill (bytes stored), smem (static bytes)} of lk_rows from ptxas's -v output (nvcc's
    or NVRTC's log); `missing` where ptxas did not say."""
    rows = log.split("entry function 'lk_rows'")[-1].split("entry function")[0]      # lk_rows' lines only
    get = lambda pattern: int(m.group(1)) if (m := re.search(pattern, rows)) else missing  # noqa: E731
    return {"regs": get(r"Used (\d+) registers"), "spill": get(r"(\d+) bytes spill stores"),
            "smem": get(r"(\d+) bytes smem")}


def sass_bytes(cubin):
    """The size of lk_rows' machine code (its ELF section .text.lk_rows) in a cubin, or 0."""
    import struct
    data = open(cubin, "rb").read()
    if data[:4] != b"\x7fELF" or data[4] != 2:        # ELF64 only
        return 0
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for h in headers:
        end = data.index(b"\0", names + h[0])
        if data[names + h[0]:end] == b".text.lk_rows":
            return h[5]
    return 0


def _smem_kib(arch):
    """(per SM, most per block) KiB of shared memory for arch (sm_90's where the table lacks it)."""
    return SMEM_KIB.get(_cc(arch), SMEM_KIB[90])


def _bytes(ctype):
    return 4 if ctype == "float" else 2


def _cc(arch):
    return int(arch.split("_")[-1].rstrip("a"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    if shutil.which("nvcc") is None:
        sys.exit("nvcc is not installed")
    shapes = [(fused_cupy.THREADS, fused_cupy.BLOCK_SHARE, fused_cupy.CACHE_TARGET)] + list(TUNING_SHAPES)
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"# lk_rows for LK^alpha in one launch (fused_cupy.SPECIALIZE; last, the gradient launch of two), nvcc {' '.join(CUPY_OPTIONS)} -arch={args.arch} "
          f"(the options CuPy gives NVRTC); {version}; the default shape first")
    print("# instr/item: the kernel's SASS instructions (16 bytes each, every path, draft_to_target's "
          "included) per logit a thread holds")
    print(f"{'V':>7} {'threads':>7} {'share':>6} {'cache':>5} | {'items':>5} {'cluster':>7} {'regs':>5} "
          f"{'spill B':>7} {'static smem':>11} {'dyn smem KiB':>12} {'blocks/SM':>9} {'SASS KiB':>8} {'instr/item':>10}")
    # float32 logits, target and gradient in every launch shape; bfloat16 ones at the default (4
    # adjacent columns at a time, 8 bytes an access), then one column at a time with the target
    # read at first use, then copied in pairs; float16 ones at the default; then float32 at the
    # default with one column at a time (no VEC), and with that and expf (the kernel before both);
    # then the gradient launch of a two-launch call (LK^alpha with a mask), 4 columns and one at a time
    variants = [(V, shape, "float", False, None, None, 0) for V in (32_000, 128_256, 300_000) for shape in shapes] + \
        [(V, shapes[0], "__nv_bfloat16", False, None, None, 0) for V in (32_000, 128_256, 300_000)] + \
        [(V, shapes[0], "__nv_bfloat16", pairs, None, False, 0) for pairs in (False, True) for V in (32_000, 128_256)] + \
        [(V, shapes[0], "__half", False, None, None, 0) for V in (32_000, 128_256)] + \
        [(V, shapes[0], "float", False, None, False, 0) for V in (32_000, 128_256)] + \
        [(V, shapes[0], "float", False, False, False, 0) for V in (32_000, 128_256)] + \
        [(V, shapes[0], "float", False, None, vec, 2) for V in (32_000, 128_256) for vec in (None, False)]
    variants = [v + (0, False, False) for v in variants]
    # last, the benchmark's 'fused pipelined' (fused_cupy.PIPELINE) at V = 32 000, with the stages this arch has room
    # for (clusters: before Hopper its blocks would meet in global memory, which it does not take)
    for threads, share in PIPE_SHAPES:
        with fused_cupy.configured(threads=threads, block_share=share):
            stages = fused_cupy.pipe_stages(fused_cupy.plan(32_000)[0], _smem_kib(args.arch)[1] * 1024)
        if stages >= 2 and _cc(args.arch) >= 90:
            variants.append((32_000, (threads, share, True), "float", False, None, None, 0, stages, False, False))
    if _cc(args.arch) >= 90:                          # and 'fused L2 ahead', 'fused L2 lead' (cp.async.bulk: Hopper on)
        variants += [(V, shapes[0], "float", False, None, None, 0, 0, True, False) for V in (32_000, 128_256)]
        variants += [(V, shapes[0], "float", False, None, None, 0, 0, False, True) for V in (32_000, 128_256)]
    with tempfile.TemporaryDirectory() as work:
        for V, (threads, share, cache), ctype, pairs, exp2, vec, phase, pipe, ahead, lead in variants:
            items, cluster, cached, res = resources(V, threads, share, cache, args.arch, work, ctype, pairs, exp2, vec,
                                                    phase, pipe, ahead, lead)
            if res is None:
                print(f"{V:7d} {threads:7d} {share:6d} {cache!s:>5} | build failed")
                continue
            per_sm = _smem_kib(args.arch)[0]
            dyn = 8 * items * threads * pipe if pipe else _bytes(ctype) * cached * threads
            kind = {"__nv_bfloat16": "bfloat16", "__half": "float16"}.get(ctype)
            note = "" if kind is None else f"  ({kind} logits, target and gradient" + \
                ("; the target copied in pairs)" if "#define P_ASYNC 2" in res["src"] else
                 "; the target kept at its first read)" if "#define P_ASYNC 0" in res["src"] and cached else ")")
            if "#define VEC 1" in res["src"]:
                note += "  (4 adjacent columns at a time)"
            elif vec is False:
                note += f"  (one column at a time, as the benchmark's '{'fused 2-byte pairs' if pairs else 'fused scalar'}')"
            if exp2 is False:
                note += "  (exps by expf)"
            if phase == 2:
                note += "  (the gradient launch of a two-launch call)"
            if "#define AHEAD 1" in res["src"]:
                note += "  (persistent, the next row asked of L2, as the benchmark's 'fused L2 ahead')"
            if "#define LEAD 1" in res["src"]:
                note += "  (a block a row asking L2 for a row ahead, as the benchmark's 'fused L2 lead')"
            if "#define PIPE 0" not in res["src"]:
                note += f"  (pipelined: {pipe} stages of logits and target, as the benchmark's 'fused pipelined')"
            if cache and 0 < cached < items:            # this GPU's blocks keep part of the target
                note += f"  (target cache: {cached} of {items} entries per thread; the rest read twice)"
            elif cache and items and not cached and phase != 2:   # (phase 2 keeps none by design)
                note += "  (no room for the target cache: runs without it)"
            by_regs = 65536 // max(1, res["regs"] * threads)
            by_smem = (per_sm * 1024) // max(1, dyn + res["smem"] + 1024)
            print(f"{V:7d} {threads:7d} {share:6d} {cache!s:>5} | {items:5d} {cluster:7d} {res['regs']:5d} "
                  f"{res['spill']:7d} {res['smem']:11d} {dyn / 1024:12.0f} "
                  f"{min(by_regs, by_smem, 2048 // threads):9d} {res['sass'] / 1024:8.0f} "
                  f"{res['sass'] / 16 / items if items else float('nan'):10.1f}{note}")


if __name__ == "__main__":
    main()
