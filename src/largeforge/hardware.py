"""Device, precision and thread detection.

Precision is decided by measuring, not by a capability flag: on a CPU without bf16 units a
bf16 matmul runs hundreds of times slower than fp32 although `torch` happily accepts it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

from largeforge.errors import LargeForgeError

OPTIONAL_EXTRAS = {
    "serve": ["fastapi", "uvicorn", "prometheus-client"],
    "export": ["gguf", "onnx", "onnxruntime"],
    "eval": ["rouge-score", "sacrebleu", "lm-eval"],
    "adapters": ["peft", "bitsandbytes"],
    "data": ["datasets", "datasketch"],
    "reports": ["matplotlib"],
}


def available_devices() -> list[str]:
    """The devices this machine can run on, as `--device` takes them."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def detect_device(preferred: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU. A named device must exist here: an unknown
    name or one this machine lacks (`cuda` without a GPU, `cuda:3` with two) is a
    `LargeForgeError` that lists the devices there are."""
    if preferred == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    available = available_devices()
    if str(preferred) not in available:
        raise LargeForgeError(f"device {str(preferred)!r} is not available here; this machine "
                              f"has: {', '.join(available)} (or auto)")
    return torch.device(preferred)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    return platform.processor() or _cpu_model_name() or platform.machine()


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 512, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n matmul (median of `repeats`, after one warm-up)."""
    # A generator of its own: measuring must not move the global RNG, which training (dropout)
    # and exact resume depend on.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    torch.mm(a, b)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / max(times[len(times) // 2], 1e-9)


@lru_cache(maxsize=8)
def bf16_speed_ratio(device_type: str = "cpu") -> float:
    """bf16 matmul throughput divided by fp32 throughput, from a tiny timed probe.

    A small matrix keeps the probe short even where bf16 is emulated (about 300x slower here).
    """
    device = torch.device(device_type)
    n = 256 if device.type == "cpu" else 1024
    try:
        fp32 = matmul_flops(device, torch.float32, n=n, repeats=3)
        bf16 = matmul_flops(device, torch.bfloat16, n=n, repeats=3)
    except (RuntimeError, TypeError):
        return 0.0
    return bf16 / fp32


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off only where it runs at least as fast as fp32."""
    return bf16_speed_ratio(device.type) >= 1.0


def resolve_precision(requested: str, device: torch.device) -> str:
    """Turn `auto` into a concrete precision: bf16 where it is fast, else fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "bf16" if device.type != "mps" and bf16_is_fast(device) else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def peak_fp32_flops(device: torch.device) -> float:
    """Measured fp32 matmul peak: the denominator of MFU on this machine (largest of 3 sizes)."""
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    return max(matmul_flops(device, torch.float32, n=n, repeats=5) for n in sizes)


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class HardwareReport:
    python: str
    torch: str
    transformers: str | None
    device: str
    device_name: str
    cpu_cores: int | None
    torch_threads: int
    memory_gib: float | None
    bf16_speed_vs_fp32: float
    bf16_fast: bool
    precision: str
    extras: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def hardware_report(device: str = "auto") -> HardwareReport:
    dev = detect_device(device)
    mem = memory_bytes()
    ratio = bf16_speed_ratio(dev.type)
    return HardwareReport(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=installed_version("transformers"),
        device=dev.type,
        device_name=device_name(dev),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        memory_gib=round(mem / 2**30, 1) if mem else None,
        bf16_speed_vs_fp32=round(ratio, 4),
        bf16_fast=ratio >= 1.0,
        precision=resolve_precision("auto", dev),
        extras={
            extra: {pkg: installed_version(pkg) for pkg in pkgs}
            for extra, pkgs in OPTIONAL_EXTRAS.items()
        },
    )


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS.

    Loading a model (reading an fp32 checkpoint, quantising it to 4 bits, casting it to bf16) frees
    hundreds of MB that glibc's allocator keeps mapped, so the process's RSS stays as high as at
    the peak of loading for the whole run: 185 MB for the base preset loaded in 4 bits. Linux
    with glibc only; elsewhere nothing happens.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def device_memory_bytes(device: torch.device) -> int | None:
    """All the memory of `device`: the GPU's own, or the machine's for the CPU (and Apple's
    unified memory); None where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return memory_bytes()
