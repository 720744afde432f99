"""What a run ran on, so that speed tables compare hardware honestly."""

from __future__ import annotations

import platform
import socket

import torch


def machine_info(dtype: str, device: torch.device | str = "cpu") -> dict:
    """The device the run computes on (the GPU's name for ``cuda``), and the software."""
    import transformers

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "device": name,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
    }
