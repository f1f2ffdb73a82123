"""Rewrite the device wheels without what tempocache never loads.

Everything sent to the lent GPU travels in one working tree of at most 64 MiB.
- diffusers: without the per-model pipeline packages (about 4 of its 6.4 MiB): tempocache needs
  diffusers' models, schedulers, hooks and `DiffusionPipeline`, and `diffusers` imports those lazily;
- torchao: without its compiled extensions (3 of its 3.4 MiB; CUTLASS and MX kernels): the float8 and
  int8 dynamic-activation configs the bench runs use torch's own kernels.
Run once after fetching the wheels:
    python scripts/slim_wheels.py [folder ...]    # default: .whl
"""

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

DROPPED = {
    "diffusers": re.compile(r"^diffusers/(pipelines|modular_pipelines)/[^/]+/"),
    "torchao": re.compile(r"^torchao/_C.*\.so$"),
}


def slim(wheel: Path, dropped: re.Pattern) -> None:
    with zipfile.ZipFile(wheel) as source:
        kept = {info.filename: source.read(info) for info in source.infolist() if not dropped.match(info.filename)}
    record_name = next(name for name in kept if name.endswith(".dist-info/RECORD"))
    records = []
    for name, data in kept.items():
        if name != record_name:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{name},sha256={digest},{len(data)}")
    kept[record_name] = ("\n".join([*records, f"{record_name},,"]) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in kept.items():
            target.writestr(name, data)
    tmp.replace(wheel)
    print(f"{wheel}: {wheel.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    folders = [Path(f) for f in sys.argv[1:]] or [Path(".whl")]
    wheels = [(wheel, pattern) for folder in folders for name, pattern in DROPPED.items() for wheel in folder.glob(f"{name}-*.whl")]
    if not wheels:
        sys.exit(f"no diffusers or torchao wheel in {', '.join(map(str, folders))} (fetch the device wheels first)")
    for wheel, pattern in wheels:
        slim(wheel, pattern)
