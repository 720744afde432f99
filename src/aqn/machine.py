"""What a run ran on, so that speed tables compare hardware honestly."""

from __future__ import annotations

import platform
import socket
import subprocess

import torch


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), which speed figures depend on; the architecture
    ("x86_64") where the system does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return platform.processor() or platform.machine()


def machine_info(dtype: str, device: torch.device | str = "cpu") -> dict:
    """The device the run computes on (the GPU's name for ``cuda``), and the software."""
    import transformers

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "device": name,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
    }
