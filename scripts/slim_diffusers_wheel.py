"""Rewrite .whl/diffusers-*.whl without the per-model pipeline packages (about 4 of its 6.4 MiB).

Everything sent to the lent GPU travels in one working tree of at most 64 MiB; tempocache
needs diffusers' models, schedulers, hooks and `DiffusionPipeline`, never a model-specific
pipeline, and `diffusers` imports those lazily. Run once after fetching the wheels:
    python scripts/slim_diffusers_wheel.py
"""

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

DROPPED = re.compile(r"^diffusers/(pipelines|modular_pipelines)/[^/]+/")


def slim(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as source:
        kept = {info.filename: source.read(info) for info in source.infolist() if not DROPPED.match(info.filename)}
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
    wheels = list(Path(sys.argv[1] if len(sys.argv) > 1 else ".whl").glob("diffusers-*.whl"))
    if not wheels:
        sys.exit("no diffusers wheel in .whl/ (fetch the device wheels first)")
    for wheel in wheels:
        slim(wheel)
