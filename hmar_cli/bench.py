"""`hmar bench train|sample`: HMAR against VAR in our engine, same shapes, one run."""
from __future__ import annotations

import json
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from hmar.benchmark import BenchRow, bench_sample, bench_train
from hmar.config import tokenizer_preset
from hmar.pipeline import resolve_device

app = typer.Typer(help="Benchmarks: HMAR vs VAR, side by side in one run.", no_args_is_help=True)
console = Console()


def _report(rows: list[BenchRow], title: str, as_json: bool, shape: dict) -> None:
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if as_json:
        print(json.dumps({"environment": env, "shape": shape, "rows": [r.as_dict() for r in rows]}))
        return
    table = Table(title=f"{title} — {env['device']}, torch {env['torch']}, " + ", ".join(f"{k} {v}" for k, v in shape.items()))
    for column in ("model", "median ms", "images/s", "peak GiB", "TFLOP/s", "speed vs VAR"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r.family.upper(), f"{r.median_ms:.1f}", f"{r.images_per_s:.1f}",
                      "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.2f}",
                      "-" if r.tflops is None else f"{r.tflops:.1f}", f"{r.ratio_vs_var:.2f}x")
    console.print(table)


@app.command("train")
def train(
    depth: int = typer.Option(16, "--depth", min=1), resolution: int = typer.Option(256, "--resolution"),
    batch_size: int = typer.Option(32, "--batch-size", min=1), width: Optional[int] = typer.Option(None, "--width", min=8),
    device: str = typer.Option("auto", "--device"), warmup: int = typer.Option(3, "--warmup", min=0),
    iters: int = typer.Option(10, "--iters", min=1), as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Stage-1 training step of HMAR (block-diagonal) vs VAR (block-causal) of the same size."""
    rows = bench_train(tokenizer_preset(resolution), depth, batch_size, resolve_device(device), width=width, warmup=warmup, iters=iters)
    _report(rows, "training step", as_json, {"depth": depth, "resolution": resolution, "batch": batch_size})


@app.command("sample")
def sample(
    depth: int = typer.Option(16, "--depth", min=1), resolution: int = typer.Option(256, "--resolution"),
    batch_size: int = typer.Option(64, "--batch-size", min=1), steps: int = typer.Option(14, "--steps", min=1),
    width: Optional[int] = typer.Option(None, "--width", min=8), device: str = typer.Option("auto", "--device"),
    warmup: int = typer.Option(2, "--warmup", min=0), iters: int = typer.Option(5, "--iters", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Sampling of HMAR (mask schedule of --steps) vs VAR (KV cache), random weights."""
    rows = bench_sample(tokenizer_preset(resolution), depth, batch_size, resolve_device(device), steps=steps, width=width, warmup=warmup, iters=iters)
    _report(rows, "sampling", as_json, {"depth": depth, "resolution": resolution, "batch": batch_size, "steps": steps})
