"""Carry CuPy's kernel cache from one GPU run to the next, so that NVRTC compiles only what changed.

A GPU run (bench/gpu_check.sh) compiles some 480 variants of lkref's kernels and the CuPy
kernels of the readable path that the GPU tests use: about a minute and a half of NVRTC on the
device in run 2, of a session's 15 minutes.  CuPy keeps what it compiles in CUPY_CACHE_DIR,
keyed by the source, the options and the compiler, so a run on the same image can load
what an earlier run built.  gpu_check.sh unpacks the archives a session carried (.cupy-cache/,
which git ignores: the last run's, and one built here before the run with
bench/nvrtc_check.py --cache, which the device finds only where its paths and versions match)
before its first compile, and packs the cache again as it ends, into the files that come back:

    python3 bench/kernel_cache.py unpack ARCHIVE DIR    # before the run, for each archive
    python3 bench/kernel_cache.py pack DIR ARCHIVE      # after it: those this run built or loaded

Packing keeps only what this run used: the files built during it, and those unpacked and read
again (unpacking sets their access time to 0; reading one sets it to now, as Linux does for a
file whose access time is older than its modification time, unless the file system does not
track access times, which is seen as no unpacked file read, and then every file is kept).
Kernels of sources that have changed since are left behind, so the archive does not grow
from run to run.  An archive over LIMIT_MIB is not written (the device tool brings back files
of 16 MiB at most).  Standard library only (tarfile, lzma)."""

from __future__ import annotations

import os
import sys
import tarfile
import time

#: Written into DIR by unpack: the time of the unpacking and the number of files unpacked.
MARKER = ".lkref-unpacked"
#: Largest archive pack writes, MiB (what the device tool brings back is 16 MiB a file).
LIMIT_MIB = 15.0
#: xz preset: 3 compresses cubins about as well as 6 in a fraction of the time.
PRESET = 3


def unpack(archive: str, folder: str) -> int:
    """Extract the regular files of `archive` (flat names only) into `folder`, their access
    times set to 0, and the marker (an earlier unpacking's, where there is one, counted in:
    several archives may be unpacked, e.g. the last run's and one built before it with
    bench/nvrtc_check.py --cache, and a file the earlier ones gave is skipped); the number of
    files extracted."""
    os.makedirs(folder, exist_ok=True)
    t0 = time.time()
    earlier = _marker(folder)
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            name = member.name[2:] if member.name.startswith("./") else member.name
            if not member.isfile() or "/" in name or name in ("", ".", "..", MARKER):
                continue                                  # a cache is one folder of files
            path = os.path.join(folder, name)
            if earlier and os.path.exists(path):
                continue                                  # an earlier archive's: the same key, the same kernel
            src = tar.extractfile(member)
            with open(path, "wb") as dst:
                dst.write(src.read())
            os.utime(path, (0, member.mtime))             # read again: access time > modification time
            count += 1
    since, total = (min(earlier[0], t0), earlier[1] + count) if earlier else (t0, count)
    with open(os.path.join(folder, MARKER), "w") as f:
        f.write(f"{since} {total}\n")
    return count


def _marker(folder):
    """(time of the first unpacking, files unpacked in all) from the marker, or None."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            since, unpacked = f.read().split()
        return float(since), int(unpacked)
    except (OSError, ValueError):
        return None


def used(folder: str):
    """(files to keep, built this run, unpacked and read again, unpacked): every file where
    nothing was unpacked or access times are not tracked, else the built and the read ones
    (none where the folder does not exist: nothing was compiled)."""
    if not os.path.isdir(folder):
        return [], 0, 0, 0
    names = sorted(n for n in os.listdir(folder) if n != MARKER and os.path.isfile(os.path.join(folder, n)))
    marker = _marker(folder)
    if marker is None:
        return names, len(names), 0, 0
    since, unpacked = marker
    stat = {n: os.stat(os.path.join(folder, n)) for n in names}
    built = [n for n in names if stat[n].st_mtime >= since]
    read = [n for n in names if stat[n].st_mtime < since and stat[n].st_atime >= since]
    if unpacked and not read:                            # access times not tracked: keep all
        return names, len(built), 0, unpacked
    return sorted(built + read), len(built), len(read), unpacked


def pack(folder: str, archive: str) -> str:
    """Write the files this run used (`used`) to `archive` (xz); a line saying what it holds,
    or why it was not written."""
    keep, built, read, unpacked = used(folder)
    if not keep:
        return "kernel cache: nothing to pack"
    tmp = archive + ".part"
    with tarfile.open(tmp, "w:xz", preset=PRESET) as tar:
        for name in keep:
            tar.add(os.path.join(folder, name), arcname=name, recursive=False)
    mib = os.path.getsize(tmp) / 2**20
    what = (f"{len(keep)} files ({built} built this run, {read} of the {unpacked} unpacked read again"
            + (": none read, or access times untracked: all kept" if unpacked and not read else "") + f"), {mib:.1f} MiB")
    if mib > LIMIT_MIB:
        os.remove(tmp)
        return f"kernel cache: not packed, {what}: over {LIMIT_MIB} MiB"
    os.replace(tmp, archive)
    return f"kernel cache: {what} in {os.path.basename(archive)}"


def main(argv):
    if len(argv) != 3 or argv[0] not in ("unpack", "pack"):
        sys.exit(__doc__.split("\n\n")[2])
    if argv[0] == "unpack":
        print(f"kernel cache: {unpack(argv[1], argv[2])} files from {argv[1]}")
    else:
        print(pack(argv[1], argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
