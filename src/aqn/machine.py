"""What a run ran on, so that speed tables compare hardware honestly."""

from __future__ import annotations

import platform
import socket

import torch


def machine_info(dtype: str) -> dict:
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
    }
