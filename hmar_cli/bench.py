"""`hmar bench attention|train|sample`: the attention kernel against its baselines, and HMAR against
VAR in our engine, same shapes, one run. Each prints a rich table, or JSON with --json, and can draw
a PNG bar chart (--chart); each also runs on the CPU at small sizes."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from hmar.config import COMPILE_MODES, PATCH_NUMS, tokenizer_preset
from hmar.errors import InputError
from hmar.outputs import check_writable
from hmar.schedule import DEFAULT_STEPS
from hmar_cli.charts import Group, write_chart
from hmar_cli.sampling import KERNELS_HELP, check_kernels

if TYPE_CHECKING:  # torch and the benchmark code are imported by the commands that run them, not by --help
    import torch

    from hmar.benchmark import BenchRow

app = typer.Typer(help="Benchmarks: the attention kernel, and HMAR vs VAR, side by side in one run.", no_args_is_help=True)
console = Console()

CHART_HELP = "Also draw the median times as a PNG bar chart here."
PROFILE_HELP = ("After timing, profile a few more steps of each family (torch.profiler) and write into this folder "
                "TASK_FAMILY.txt (the top operators / kernels) and TASK_FAMILY.json (time per category); the categories also go into --json.")
FAMILIES = ("hmar", "var")
SAMPLE_DEPTH, SAMPLE_RESOLUTION = 16, 256  # random models of `hmar bench sample`: d16 at 256 px


def _chart_target(chart: Optional[Path], overwrite: bool) -> None:
    """Fail before the benchmark runs when its chart could not be written."""
    if chart is None:
        return
    if chart.suffix.lower() != ".png":
        raise InputError(f"--chart must name a .png file, got {str(chart)!r}")
    check_writable([chart], overwrite)


def _profile_files(folder: Optional[Path], task: str, overwrite: bool, models: Sequence[str] = FAMILIES) -> dict[str, tuple[Path, Path]]:
    """Each model's profile table and breakdown paths (TASK_NAME.txt/.json, NAME: the family, or a
    named model's last path part), checked (folder made) before the benchmark runs."""
    if folder is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for model in models:
        stem = f"{task}_{Path(model).name}"
        files[model] = (folder / f"{stem}.txt", folder / f"{stem}.json")
    check_writable([path for pair in files.values() for path in pair], overwrite)
    return files


def _write_profiles(rows: list[BenchRow], files: dict[str, tuple[Path, Path]], shape: dict, device: torch.device) -> None:
    for row in rows:
        if row.profile is None or row.model not in files:
            continue
        table_path, breakdown_path = files[row.model]
        table_path.write_text(row.profile.table)
        record = {"environment": _environment(device), "shape": shape, "kernels": row.kernels, "family": row.family, "model": row.model,
                  "median_ms": row.median_ms, **row.profile.breakdown}
        breakdown_path.write_text(json.dumps(record, indent=2) + "\n")


def _print_breakdowns(rows: list[BenchRow]) -> None:
    profiled = [r for r in rows if r.profile is not None]
    if not profiled:
        return
    counted = profiled[0].profile.breakdown["counted"]
    table = Table(title=f"where the time goes (ms per step, {counted})")
    table.add_column("category")
    for r in profiled:
        table.add_column(_label(r), justify="right")
    for name in profiled[0].profile.breakdown["categories"]:
        cells = [r.profile.breakdown["categories"][name] for r in profiled]
        table.add_row(name, *(f"{c['ms']:.2f} ({c['percent']:.0f}%)" for c in cells))
    table.add_row("total", *(f"{r.profile.breakdown['total_ms']:.2f}" for r in profiled))
    console.print(table)


def _cpu_note(where: torch.device, runs: str, quick: str, quiet: bool) -> None:
    """One line before a CPU run of a GPU benchmark, which would otherwise print nothing for minutes
    (none under --json, like the progress of the other commands)."""
    if where.type == "cpu" and not quiet:
        print(f"note: a GPU benchmark, here on the CPU in float32: it runs {runs} for HMAR and for VAR, minutes at "
              f"these sizes; `{quick}` is a quick check", file=sys.stderr, flush=True)


def _label(row: BenchRow) -> str:
    """HMAR / VAR for random models, the name for named ones."""
    return row.family.upper() if row.model in FAMILIES else row.model


def _environment(device: torch.device) -> dict:
    import torch

    return {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _report(rows: list[BenchRow], title: str, as_json: bool, shape: dict, device: torch.device, chart: Optional[Path], overwrite: bool) -> None:
    env = _environment(device)
    if chart is not None:
        shape_text = ", ".join(f"{k} {v}" for k, v in shape.items())
        groups: list[Group] = [(f"{title}: {shape_text}", [(_label(r), r.median_ms) for r in rows])]
        write_chart(chart, f"{title}, median ms: {env['device']}, torch {env['torch']}", groups,
                    {"environment": json.dumps(env), "shape": json.dumps(shape), "kernels": json.dumps(rows[0].kernels)}, overwrite)
    if as_json:
        print(json.dumps({"environment": env, "shape": shape, "kernels": rows[0].kernels, "rows": [r.as_dict() for r in rows]}))
        return
    table = Table(title=f"{title} — {env['device']}, torch {env['torch']}, " + ", ".join(f"{k} {v}" for k, v in shape.items()))
    for column in ("model", "median ms", "images/s", "peak GiB", "TFLOP/s", "speed vs VAR"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(_label(r), f"{r.median_ms:.1f}", f"{r.images_per_s:.1f}",
                      "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.2f}",
                      "-" if r.tflops is None else f"{r.tflops:.1f}", "-" if r.ratio_vs_var is None else f"{r.ratio_vs_var:.2f}x")
    console.print(table)
    console.print(f"kernels: {_kernels_text(rows[0].kernels)}", highlight=False)
    _print_breakdowns(rows)


def _kernels_text(policy: dict) -> str:
    from hmar.policy import KernelPolicy

    return KernelPolicy.from_dict(policy).compact()


def _policy(kernels: str):
    """--kernels reference as a policy; None lets the benchmark choose from its other flags."""
    from hmar.policy import KernelPolicy

    return KernelPolicy.reference() if kernels == "reference" else None


@app.command("train")
def train(
    depth: int = typer.Option(16, "--depth", min=1), resolution: int = typer.Option(256, "--resolution"),
    batch_size: int = typer.Option(32, "--batch-size", min=1), width: Optional[int] = typer.Option(None, "--width", min=8),
    device: str = typer.Option("auto", "--device"), warmup: int = typer.Option(3, "--warmup", min=0),
    iters: int = typer.Option(10, "--iters", min=1),
    loss: str = typer.Option("chunked", "--loss", help="chunked: the trainer's loss (logits head in chunks); logits: all float32 logits at once, to compare."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="Compile both families' blocks, as the trainer does (default: on CUDA)."),
    compile_mode: str = typer.Option("default", "--compile-mode", help=f"Inductor's mode for the compiled blocks: {', '.join(COMPILE_MODES)}."),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="Replay each whole step as one CUDA graph, as the trainer does on one GPU (default: on CUDA; CUDA only)."),
    kernels: str = typer.Option("auto", "--kernels", help=KERNELS_HELP + " With reference, no --compile or --cuda-graph."),
    as_json: bool = typer.Option(False, "--json"), profile: Optional[Path] = typer.Option(None, "--profile", help=PROFILE_HELP),
    chart: Optional[Path] = typer.Option(None, "--chart", help=CHART_HELP), overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Stage-1 training step of HMAR (block-diagonal) vs VAR (block-causal) of the same size, the
    trainer's own step (loss, gradient clipping, AdamW; on CUDA bf16, fused AdamW, compiled blocks and
    the step replayed as a CUDA graph)."""
    from hmar.pipeline import resolve_device
    from hmar.train.benchmark import LOSS_PATHS, bench_train

    if loss not in LOSS_PATHS:
        raise InputError(f"--loss must be one of {', '.join(LOSS_PATHS)}, got {loss!r}")
    if compile_mode not in COMPILE_MODES:
        raise InputError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    check_kernels(kernels, compile=compile, cuda_graph=cuda_graph)
    where = resolve_device(device)
    if cuda_graph and where.type != "cuda":
        raise InputError(f"--cuda-graph needs a CUDA device; this run is on {where}")
    _chart_target(chart, overwrite)
    profile_files = _profile_files(profile, "train", overwrite)
    _cpu_note(where, f"{warmup + iters} training steps of depth {depth} at batch {batch_size}, {resolution} px,",
              "hmar bench train --depth 2 --resolution 256 --batch-size 2 --warmup 0 --iters 1", as_json)
    rows = bench_train(tokenizer_preset(resolution), depth, batch_size, where, width=width, warmup=warmup, iters=iters, loss=loss,
                       compile=compile, profile=profile is not None, compile_mode=compile_mode, cuda_graph=cuda_graph, kernels=_policy(kernels))
    compiled = rows[0].compiled
    shape = {"depth": depth, "resolution": resolution, "batch": batch_size, "loss": loss, "compiled blocks": compiled,
             "compile mode": compile_mode if compiled else None, "CUDA graphs": rows[0].cuda_graph}
    _write_profiles(rows, profile_files, shape, where)
    _report(rows, "training step" + (" (both compiled)" if compiled else " (eager)"), as_json, shape, where, chart, overwrite)


@app.command("sample")
def sample(
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help=f"Depth of the random models (width 64·depth, as published; default {SAMPLE_DEPTH})."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help=f"Image size of the random models: {', '.join(map(str, PATCH_NUMS))} (default {SAMPLE_RESOLUTION})."),
    batch_size: int = typer.Option(64, "--batch-size", min=1), steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, help="HMAR's mask-schedule steps (VAR takes one per scale)."),
    width: Optional[int] = typer.Option(None, "--width", min=8, help="Width of the random models instead of 64·depth."),
    device: str = typer.Option("auto", "--device"),
    warmup: int = typer.Option(2, "--warmup", min=0), iters: int = typer.Option(5, "--iters", min=1),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Benchmark these models (registry names or folders, already downloaded; repeat for several) at their own size, instead of random HMAR and VAR ones."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="Compile the transformers' blocks (default: off, as `hmar generate`)."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="Replay batches as CUDA graphs (on CUDA), as generate does."),
    kernels: str = typer.Option("auto", "--kernels", help=KERNELS_HELP + " With reference, no --compile."),
    as_json: bool = typer.Option(False, "--json"), profile: Optional[Path] = typer.Option(None, "--profile", help=PROFILE_HELP),
    chart: Optional[Path] = typer.Option(None, "--chart", help=CHART_HELP), overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Sampling of HMAR (mask schedule of --steps) vs VAR (KV cache), as `hmar generate` samples:
    random weights of --depth at --resolution, or the --model(s) named."""
    from hmar.benchmark import bench_sample
    from hmar.pipeline import resolve_device
    from hmar.schedule import resolve_schedule

    check_kernels(kernels, compile=compile)
    models = list(dict.fromkeys(model or []))
    sized = [name for name, value in (("--depth", depth), ("--width", width), ("--resolution", resolution)) if value is not None]
    if models and sized:
        raise InputError(f"{', '.join(sized)} size the random models; --model benchmarks the named ones at their own size")
    depth = SAMPLE_DEPTH if depth is None else depth
    resolution = SAMPLE_RESOLUTION if resolution is None else resolution
    if resolution not in PATCH_NUMS:
        raise InputError(f"--resolution must be one of {', '.join(map(str, PATCH_NUMS))}, got {resolution}")
    tokenizer = tokenizer_preset(resolution)
    if not models:  # a named model's scales are known once it is loaded, which checks the steps then
        resolve_schedule(tokenizer.patch_nums, steps=steps, family="hmar")
    _chart_target(chart, overwrite)
    profile_files = _profile_files(profile, "sample", overwrite, models or FAMILIES)
    where = resolve_device(device)
    what = ", ".join(models) if models else f"depth {depth}, {resolution} px"
    _cpu_note(where, f"{warmup + iters} batches of {batch_size} images ({what}, {steps} steps)" + ("" if models else ","),
              "hmar bench sample --depth 2 --batch-size 1 --warmup 0 --iters 1", as_json)
    rows = bench_sample(tokenizer, depth, batch_size, where, steps=steps, width=width, warmup=warmup, iters=iters,
                        profile=profile is not None, compile=compile, models=models, cuda_graph=cuda_graph, kernels=_policy(kernels))
    compiled = rows[0].compiled
    shape = {"models": ", ".join(models)} if models else {"depth": depth, "resolution": resolution}
    if width is not None:
        shape["width"] = width
    shape.update({"batch": batch_size, "steps": steps, "compiled blocks": compiled, "CUDA graphs": rows[0].cuda_graph})
    _write_profiles(rows, profile_files, shape, where)
    _report(rows, "sampling" + (" (compiled)" if compiled else " (eager)"), as_json, shape, where, chart, overwrite)


def _patch_nums(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise InputError(f"--patch-nums takes positive integers separated by commas (e.g. 1,2,3,4), got {text!r}")
    return values


def _attention_chart_groups(rows: list[dict]) -> list[Group]:
    """One group per benchmarked shape, a bar per implementation: forward+backward median ms."""
    groups: dict[str, list] = {}
    for r in rows:
        if "fwd_bwd_ms" in r:
            shape = f"{r['res']} px" if r["res"] else f"{r['tokens']} tokens"
            groups.setdefault(f"{shape}, batch {r['batch']}, {r['pattern']}", []).append((r["impl"], r["fwd_bwd_ms"]))
    return list(groups.items())


@app.command("attention")
def attention(
    resolution: Optional[list[int]] = typer.Option(None, "--resolution", help=f"{', '.join(map(str, sorted(PATCH_NUMS)))}; repeat for several (default: all on CUDA, the smallest on the CPU)."),
    patch_nums: Optional[str] = typer.Option(None, "--patch-nums", help="Custom scales instead of a resolution's, e.g. 1,2,3,4 (small shapes for the CPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: 16 (4 at 1024 px)."),
    heads: int = typer.Option(16, "--heads", min=1), head_dim: int = typer.Option(64, "--head-dim", min=1),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    pattern: Optional[list[str]] = typer.Option(None, "--pattern", help="block_diagonal or block_causal; repeat for both (default)."),
    impl: Optional[list[str]] = typer.Option(None, "--impl", help="triton, sdpa-mask, sdpa-per-scale or flex; repeat for several (default: all; on the CPU all but flex)."),
    device: str = typer.Option("auto", "--device"),
    warmup: float = typer.Option(25.0, "--warmup", min=0, help="Milliseconds of warm-up calls per measurement."),
    rep: float = typer.Option(100.0, "--rep", min=0, help="Milliseconds of timed calls per measurement (at least one)."),
    as_json: bool = typer.Option(False, "--json"),
    chart: Optional[Path] = typer.Option(None, "--chart", help=CHART_HELP), overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Block-sparse attention: our Triton kernel vs SDPA with a mask, SDPA per scale and compiled
    FlexAttention, forward / backward / both, on the same tensors. On the CPU our kernel runs only
    under TRITON_INTERPRET=1 (slow, for checking); otherwise its row says why it did not run."""
    from hmar.kernels import bench  # here, not at the top: Triton (hence hmar.kernels) exists on Linux only
    from hmar.pipeline import resolve_device
    from hmar.policy import KernelPolicy

    where = resolve_device(device)
    resolutions = resolution or (sorted(PATCH_NUMS) if where.type == "cuda" else [min(PATCH_NUMS)])
    checks = {"--resolution": (resolutions, PATCH_NUMS), "--pattern": (pattern or [], bench.PATTERNS),
              "--impl": (impl or [], bench.IMPLS), "--dtype": ([dtype], bench.DTYPES)}
    for option, (given, allowed) in checks.items():
        unknown = [str(value) for value in given if value not in allowed]
        if unknown:
            raise InputError(f"{option}: {', '.join(unknown)} not one of {', '.join(map(str, allowed))}")
    _chart_target(chart, overwrite)
    cells = bench.make_cells(resolutions, pattern or bench.PATTERNS, batch_size, heads, head_dim, bench.DTYPES[dtype],
                             _patch_nums(patch_nums) if patch_nums else None)
    result = bench.run(cells, impl or bench.default_impls(where), where, warmup, rep, log=lambda line: print(line, file=sys.stderr, flush=True))
    env, rows = result["env"], result["rows"]
    if chart is not None:
        title = f"attention, forward+backward median ms: {env['device']}, torch {env['torch']}, triton {env['triton']}"
        write_chart(chart, title, _attention_chart_groups(rows), {"environment": json.dumps(env)}, overwrite)
    trained_with = KernelPolicy.choose(where, training=True)  # the implementation the trainer takes here
    if as_json:
        print(json.dumps({"environment": env, "kernels": trained_with.as_dict(), "rows": rows, "autotuned": result["autotuned"]}))
        return
    bench.print_table(rows, env)
    console.print(f"the trainer's attention here: {trained_with.attention}", highlight=False)
