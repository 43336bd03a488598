"""The real guest's boot image: the installed Debian cloud kernel and a busybox initramfs.

The initramfs holds a static busybox, the six virtio modules the balloon needs (from
the same kernel's /lib/modules) and the guest scripts in guest/ (init, agent,
workloads). It is built with cpio once and cached under out/qemu-guest/, keyed by the
kernel version and a hash of the scripts, so a changed script rebuilds it.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.paths import out_dir

GUEST_DIR = Path(__file__).resolve().parent / "guest"
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_balloon")
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
FIX = "install them with: apt-get install qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio"


class ImageError(RuntimeError):
    """The guest image cannot be built; the message says what is missing and the fix."""


@dataclass(frozen=True)
class GuestImage:
    kernel: str          # path of the bzImage
    initrd: str          # path of the cached initramfs
    kernel_version: str  # e.g. 6.1.0-56-cloud-amd64


def find_kernel(pattern: str = "/boot/vmlinuz-*-cloud-amd64") -> tuple[str, str]:
    """(bzImage path, version) of the newest installed cloud kernel that has modules."""
    found = []
    for path in glob.glob(pattern):
        version = os.path.basename(path)[len("vmlinuz-"):]
        if os.path.isdir(f"/lib/modules/{version}/kernel/drivers/virtio"):
            found.append((_version_key(version), path, version))
    if not found:
        raise ImageError(f"no Debian cloud kernel with virtio modules ({pattern}); {FIX}")
    _, path, version = max(found)
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path} is not readable (run as root)")
    return path, version


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.-]", v))


def _busybox() -> str:
    for p in BUSYBOX_PATHS:
        if os.path.exists(p):
            out = subprocess.run(["file", "-L", p], capture_output=True, text=True).stdout \
                if shutil.which("file") else "statically linked"
            if "dynamically linked" not in out:
                return p
    raise ImageError(f"no static busybox at {' or '.join(BUSYBOX_PATHS)}; {FIX}")


def _module_path(version: str, name: str) -> str:
    hits = glob.glob(f"/lib/modules/{version}/kernel/drivers/virtio/{name}.ko*")
    if not hits:
        raise ImageError(f"module {name} not found for kernel {version}; {FIX}")
    return hits[0]


def _scripts_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(GUEST_DIR.glob("*.sh")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def build_image(cache: Path | None = None) -> GuestImage:
    """The guest image, from the cache when it is current, else built now (~1 s)."""
    kernel, version = find_kernel()
    if not shutil.which("cpio"):
        raise ImageError(f"cpio is not installed; {FIX}")
    cache = cache or out_dir() / "qemu-guest"
    cache.mkdir(parents=True, exist_ok=True)
    initrd = cache / f"initramfs-{version}-{_scripts_hash()}.cpio.gz"
    if not initrd.exists():
        _build_initramfs(version, initrd)
    return GuestImage(kernel=kernel, initrd=str(initrd), kernel_version=version)


def _build_initramfs(version: str, dest: Path) -> None:
    busybox = _busybox()
    with tempfile.TemporaryDirectory(prefix="balloon-lab-initramfs-") as root:
        r = Path(root)
        for d in ("bin", "dev", "proc", "sys", "tmp", "lab", "lib/modules"):
            (r / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, r / "bin/busybox")
        (r / "bin/sh").symlink_to("busybox")
        for m in MODULES:
            src = _module_path(version, m)
            data = Path(src).read_bytes()
            if src.endswith(".xz") or src.endswith(".zst"):
                raise ImageError(f"{src} is compressed; the lab's busybox insmod needs plain .ko modules")
            (r / f"lib/modules/{m}.ko").write_bytes(data)
        shutil.copy2(GUEST_DIR / "init.sh", r / "init")
        os.chmod(r / "init", 0o755)
        for name in ("agent.sh", "workload.sh"):
            shutil.copy2(GUEST_DIR / name, r / "lab" / name)
        names = subprocess.run(["find", "."], cwd=r, capture_output=True, text=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=r, input=names.encode(),
                              capture_output=True, check=True).stdout
    tmp = dest.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        f.write(cpio)
    os.replace(tmp, dest)
