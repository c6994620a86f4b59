"""`hmar env`: versions, devices, the kernel policy and cache locations, for bug reports and set-up checks."""
from __future__ import annotations

import json
import platform
import sys
from importlib import metadata

import typer
from rich.console import Console

import hmar
from hmar import hub

PACKAGES = ("torch", "triton", "numpy", "pillow", "opencv-python-headless", "huggingface-hub", "safetensors",
            "typer", "rich", "platformdirs")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "default": "cuda" if cuda else "cpu",
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def _policies(device: str) -> dict:
    """The kernel policies (`hmar.policy`) that `hmar generate` and `hmar train` take on `device` by default."""
    from hmar.policy import KernelPolicy

    return {"sampling": KernelPolicy.choose(device, training=False), "training": KernelPolicy.choose(device, training=True)}


def _triton() -> dict:
    """Whether the Triton kernels import here, and whether they launch without Triton's per-call
    dispatch (`hmar.kernels.launch`)."""
    from hmar.policy import triton_available

    if not triton_available():
        return {"kernels": False, "direct_launch": None}
    from hmar.kernels.launch import direct_launch_supported

    return {"kernels": True, "direct_launch": direct_launch_supported()}


def environment() -> dict:
    devices = _devices()
    return {
        "hmar": hmar.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "device": devices,
        "kernels": {mode: policy.as_dict() for mode, policy in _policies(devices["default"]).items()},
        "triton": _triton(),
        "cache": {key: str(path) for key, path in hub.cache_dirs().items()},
        "offline": hub.is_offline(),
        "bundled_models": list(hub.bundled_models()),
    }


def env(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")) -> None:
    """Versions, devices, the kernels sampling and training take here, and cache paths."""
    info = environment()
    if as_json:
        print(json.dumps(info))
        return
    console = Console()
    console.print(f"[bold]hmar[/bold] {info['hmar']}  (Python {info['python']}, {info['platform']})")
    console.print("[bold]packages[/bold]: " + ", ".join(f"{k} {v or '-'}" for k, v in info["packages"].items()))
    device = info["device"]
    gpus = ", ".join(device["gpus"]) or "none"
    console.print(f"[bold]device[/bold]: default {device['default']}; CUDA {device['cuda_version'] or '-'}; GPUs: {gpus}")
    triton = info["triton"]
    launch = "" if not triton["kernels"] else ", launched directly" if triton["direct_launch"] else ", launched through Triton's dispatch"
    console.print(f"[bold]Triton kernels[/bold]: {'importable' + launch if triton['kernels'] else 'not importable here'}", highlight=False)
    for mode, policy in _policies(device["default"]).items():
        text = "reference (PyTorch's float32 ops, eager)" if policy.is_reference else policy.compact().replace(",", ", ")
        console.print(f"[bold]kernels ({mode})[/bold]: {text}", highlight=False)
    for key, path in info["cache"].items():
        console.print(f"[bold]{key} cache[/bold]: {path}" if key != "bundled" else f"[bold]bundled models[/bold]: {path} "
                      f"({', '.join(info['bundled_models']) or 'none'})")
    console.print(f"[bold]offline[/bold]: {'yes (HF_HUB_OFFLINE)' if info['offline'] else 'no'}")
