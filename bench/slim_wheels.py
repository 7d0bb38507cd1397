"""Fit the GPU machine's missing wheels into one call's 64 MiB carry.

``shared/gpu/fetch-wheels.sh`` downloads ``.whl`` (43 MB) and ``.whl2`` (38 MB, Unsloth),
too much to carry together. Most of it is dead weight there: bitsandbytes ships one
library per CUDA version (the H200 image is CUDA 13.0) and the Unsloth wheel carries its
web "studio". This copies the wheels into ``.whlbench/`` and ``.whlbench/unsloth/`` (git-ignored)
without those, keeping each wheel's RECORD consistent; bench/README.md shows the call.
It adds grpcio and protobuf at the project's pins (the gRPC stubs the GPU tests import
refuse an older grpcio, and the image's grpcio has been 1.84 on some machines), and the
health and reflection services ``python -m trainer serve`` needs, which the image lacks.
``--no-unsloth`` leaves Unsloth out (the serving bench and tests do not use it): 12 MiB.

    python3 bench/slim_wheels.py [--no-unsloth] && du -sh .whlbench
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The runtime the generated stubs (``finetune/``) check for, at the project's pins.
STUB_RUNTIME = ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection")
DROP = [
    re.compile(r"^bitsandbytes/libbitsandbytes_cuda1(1|2)\d\.so$"),  # keep cuda13x and cpu
    re.compile(r"^studio/"),  # Unsloth's web UI
]


def slim(src: Path, dest: Path) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename
            if any(p.search(name) for p in DROP):
                continue
            data = zin.read(name)
            if name.endswith(".dist-info/RECORD"):
                keep = [
                    line
                    for line in data.decode().splitlines()
                    if not any(p.search(line.split(",")[0]) for p in DROP)
                ]
                data = ("\n".join(keep) + "\n").encode()
            zout.writestr(info, data)


def main() -> None:
    out = ROOT / ".whlbench"
    out.mkdir(exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if "/.whlbench/" not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with open(exclude, "a") as f:
            f.write("/.whlbench/\n")
    unsloth = "--no-unsloth" not in sys.argv[1:]
    if not list((ROOT / (".whl2" if unsloth else ".whl")).glob("*.whl")):
        fetch = ["bash", str(ROOT.parent / "shared/gpu/fetch-wheels.sh")]
        subprocess.run(fetch + ([] if unsloth else ["--no-unsloth"]), check=True)
    # Unsloth's set goes into its own folder: only its benchmark subprocess sees it.
    sets = [(".whl", out)]
    if unsloth:
        (out / "unsloth").mkdir(exist_ok=True)
        sets.append((".whl2", out / "unsloth"))
    for src, dest in sets:
        for w in sorted((ROOT / src).glob("*.whl")):
            slim(w, dest / w.name)
    pins = (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
    runtime = [line for line in pins if line.split("==")[0] in STUB_RUNTIME]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *(arg for p in platforms for arg in ("--platform", p)),
            "-d",
            str(out),
            *runtime,
        ],
        check=True,
    )
    total = sum(p.stat().st_size for p in out.rglob("*.whl"))
    print(f"{total / 2**20:.1f} MiB of wheels in {out} and {out / 'unsloth'}")


if __name__ == "__main__":
    main()
