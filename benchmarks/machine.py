"""Who ran a benchmark: machine, library versions and commit, as flat ``{column: value}`` strings."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_info() -> dict[str, str]:
    """GPU name, memory and clocks from nvidia-ml-py (NVML) where present, else from torch."""
    if not torch.cuda.is_available():
        return {"gpu_name": "", "gpu_memory_gib": "", "gpu_clocks_mhz": ""}
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    out = {"gpu_name": props.name, "gpu_memory_gib": f"{props.total_memory / 2**30:.1f}", "gpu_clocks_mhz": ""}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            sm = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
            sm_max = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
            memclk = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
            out["gpu_memory_gib"] = f"{mem.total / 2**30:.1f}"
            out["gpu_clocks_mhz"] = f"sm {sm}/{sm_max} mem {memclk}"
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # NVML absent or refused: the torch numbers stand
        out["gpu_clocks_mhz"] = f"n/a ({type(err).__name__})"
    return out


def load_average() -> str:
    """The 1-minute load average now (a busy machine makes CPU numbers noisy)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def native_module() -> str:
    """The compiled CPU module that runs: file name, the first 12 hex digits of its SHA-256 and its
    modification time (the extension is built in place and can change between runs of one commit)."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("uhc_fast._native_cpu")
    if spec is None or spec.origin is None:
        return "not built"
    path = Path(spec.origin)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    mtime = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{path.name.split('.')[0]} sha256:{digest} built {mtime}"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_commit() -> str:
    """Short commit of the working tree, with ``+dirty`` when it has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe() -> dict[str, str]:
    """The machine/software columns stamped on every result row."""
    import uhc_fast

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg": load_average(),
        "cpu_model": cpu_model(),
        "cpu_cores": str(usable_cores()),
        "torch_threads": str(torch.get_num_threads()),
        **gpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "choix": _version("choix"),
        "triton": _version("triton"),
        "uhc_fast": uhc_fast.__version__,
        "commit": git_commit(),
        "native_module": native_module(),
    }
    return info


def machine_line(info: dict[str, str]) -> str:
    """One human line naming the machine, e.g. for a Markdown heading or a plot title."""
    text = f"{info['cpu_model']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads"
    text += f", load {info['load_avg']})" if info.get("load_avg") else ")"
    if info.get("gpu_name"):
        text += f"; {info['gpu_name']} {info['gpu_memory_gib']} GiB"
        if info.get("gpu_clocks_mhz"):
            text += f" ({info['gpu_clocks_mhz']} MHz)"
    return text
