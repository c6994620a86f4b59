"""Benchmark: the Triton block-sparse attention against every baseline, in one run, on the same tensors.

    python -m hmar.kernels.bench [--res 256 512 1024] [--patterns block_diagonal block_causal] [--json out.json]
    hmar bench attention …   (the same benchmark from the command line, also at small sizes on the CPU)

Default shapes: bf16, 16 heads, head dim 64 (a d16 model's attention); batch 16 at 256/512 px, 4 at
1024 px; the token blocks are the scales' token counts. For each implementation: forward (grad enabled, as in training),
backward alone (graph kept, gradients reset) and forward+backward, median times: CUDA events on the
GPU (triton.testing.do_bench), the wall clock on the CPU under the same warm-up/repetition budgets.
On the GPU each time is the median of ROUNDS such medians, and an implementation whose first call
compiled or autotuned (over a second) keeps running for SETTLE_S before it is timed: per-call host
times read high for a while after compilation and in short bursts later, which moves single-window
medians of host-bound cells (256 px) far more than the kernels differ.
TFLOP/s counts useful work only: 4·pairs·D per head forward, 2.5× that backward, pairs = allowed
query-key pairs. Each output is checked against the first implementation that ran (ours when it can).

On the CPU our kernel runs only under Triton's interpreter (TRITON_INTERPRET=1, set before Python
starts; slow, for checking); otherwise its row records why it did not run and the baselines are timed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from . import devices
from .block_sparse_attention import block_sparse_attention, picked_configs
from .reference import PATTERNS, flex_attention_baseline, sdpa_masked, sdpa_per_scale, useful_pairs
from .scales import PATCH_NUMS

BATCH = {256: 16, 512: 16, 1024: 4}
HEADS, HEAD_DIM = 16, 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

OURS = "triton"
# key (command-line name) -> (label in rows and tables, function)
IMPLS: dict[str, tuple[str, Callable]] = {
    OURS: ("triton (ours)", block_sparse_attention),
    "sdpa-mask": ("sdpa + bool mask", sdpa_masked),
    "sdpa-per-scale": ("sdpa per scale", sdpa_per_scale),
    "flex": ("flex (compiled)", flex_attention_baseline),
}
TIMED = ("fwd_ms", "bwd_ms", "fwd_bwd_ms")
ROUNDS = 3  # do_bench windows per GPU time (their median is reported; each in the JSON rows)
SETTLE_S = 2.0  # seconds of untimed calls after a compiling first call


@dataclass(frozen=True)
class Cell:
    """One benchmarked shape: the scales (patch_nums), batch, heads, head dim, dtype and pattern.
    `res` names the resolution when the scales are that resolution's (None for custom scales)."""

    patch_nums: tuple[int, ...]
    batch: int
    pattern: str
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    dtype: torch.dtype = torch.bfloat16
    res: int | None = None

    @property
    def sizes(self) -> list[int]:
        return [p * p for p in self.patch_nums]


def make_cells(resolutions: Iterable[int], patterns: Iterable[str], batch: int | None = None, heads: int = HEADS,
               head_dim: int = HEAD_DIM, dtype: torch.dtype = torch.bfloat16,
               patch_nums: Sequence[int] | None = None) -> list[Cell]:
    """The cells of a run: every resolution (or the given custom scales) × every pattern. `batch`
    None: BATCH's per resolution (16 for custom scales)."""
    shapes = [(tuple(patch_nums), None)] if patch_nums else [(PATCH_NUMS[r], r) for r in resolutions]
    return [Cell(pn, batch or BATCH.get(res, 16), pattern, heads, head_dim, dtype, res)
            for pn, res in shapes for pattern in patterns]


def default_impls(device: torch.device) -> list[str]:
    # compiling FlexAttention for the CPU takes minutes and says nothing about the GPU: ask for it by name
    return list(IMPLS) if device.type == "cuda" else [k for k in IMPLS if k != "flex"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_clock_ms(fn, warmup: float, rep: float, grad_to_none=None) -> float:
    """do_bench's contract on the CPU: calls for `warmup` ms, then for `rep` ms (at least one), median."""
    def timed_call() -> float:
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < end:
        timed_call()
    times = [timed_call()]
    end = time.perf_counter() + rep / 1e3
    while time.perf_counter() < end:
        times.append(timed_call())
    return statistics.median(times)


def _time_ms(fn, device: torch.device, warmup: float, rep: float, grad_to_none=None) -> list[float]:
    """Median times of the measurement windows: ROUNDS do_bench windows on the GPU, one on the CPU."""
    if device.type != "cuda":
        return [_wall_clock_ms(fn, warmup, rep, grad_to_none)]
    import triton.testing

    return [float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
            for _ in range(ROUNDS)]


def _settle(fn, device: torch.device, seconds: float) -> None:
    """Untimed calls for `seconds`, then a sync."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
    _sync(device)


def _flex_setup():
    try:  # the compiled backward otherwise refuses retain_graph=True (donated buffers)
        import torch._functorch.config as fconfig

        fconfig.donated_buffer = False
    except Exception:
        pass


def _graph_replay_ms(fn, rep: float) -> dict:
    """Forward under CUDA-graph replay: GPU time only, without the host's launch cost."""
    import triton.testing

    try:
        with torch.no_grad():
            return {"fwd_graph_ms": float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))}
    except Exception as exc:
        return {"graph_note": f"{type(exc).__name__}: {str(exc)[:120]}"}


def _time_impl(fn, q, k, v, do, cell: Cell, device, warmup, rep) -> dict:
    """fwd, bwd (alone, on a kept graph) and fwd+bwd times of one implementation, and its TFLOP/s."""
    call = lambda: fn(q, k, v, cell.sizes, cell.pattern, None)  # noqa: E731
    times = {}

    def timed(key, fn_, grad_to_none=None):
        windows = _time_ms(fn_, device, warmup, rep, grad_to_none)
        times[key], times[key[:-3] + "_windows_ms"] = statistics.median(windows), windows

    timed("fwd_ms", call)
    try:
        out = call()
        timed("bwd_ms", lambda: out.backward(do, retain_graph=True), [q, k, v])
    except Exception as exc:  # e.g. a compiled backward that refuses retain_graph
        times["bwd_note"] = f"backward alone not timed: {type(exc).__name__}"
    out = None
    timed("fwd_bwd_ms", lambda: call().backward(do), [q, k, v])
    if "bwd_ms" not in times:  # backward = (forward+backward) - forward
        times["bwd_ms"] = times["fwd_bwd_ms"] - times["fwd_ms"]
        times["bwd_derived"] = True
    fwd_flop = 4.0 * useful_pairs(cell.sizes, cell.pattern) * cell.head_dim * cell.batch * cell.heads
    for key, factor in zip(TIMED, (1.0, 2.5, 3.5)):
        times[key[:-3] + "_tflops"] = factor * fwd_flop / times[key] * 1e-9
    return times


def run_cell(cell: Cell, impls: Sequence[str], device: torch.device, warmup: float = 25, rep: float = 100,
             log=print) -> list[dict]:
    sizes = cell.sizes
    n, b = sum(sizes), cell.batch
    g = torch.Generator(device=device).manual_seed(cell.res or n)
    mk = lambda: torch.randn(b, cell.heads, n, cell.head_dim, device=device, dtype=cell.dtype, generator=g)  # noqa: E731
    q, k, v = (mk().requires_grad_() for _ in range(3))
    do = mk()
    rows, reference = [], None
    for key in impls:
        label, fn = IMPLS[key]
        if key == "sdpa-per-scale" and cell.pattern != "block_diagonal":
            continue
        row = {"res": cell.res, "patch_nums": list(cell.patch_nums), "pattern": cell.pattern, "impl": label,
               "tokens": n, "batch": b, "heads": cell.heads, "head_dim": cell.head_dim,
               "dtype": str(cell.dtype).removeprefix("torch."), "pairs": useful_pairs(sizes, cell.pattern)}
        try:
            t0 = time.time()
            out = fn(q, k, v, sizes, cell.pattern, None)
            out.backward(do)
            _sync(device)
            row["first_call_s"] = round(time.time() - t0, 2)
            if device.type == "cuda" and row["first_call_s"] > 1.0:
                q.grad = k.grad = v.grad = None
                _settle(lambda: fn(q, k, v, sizes, cell.pattern, None).backward(do), device, SETTLE_S)
            if reference is None:
                reference = (label, out.detach().float())
            else:
                row["rel_err_vs"] = reference[0]
                row["rel_err"] = float((out.detach().float() - reference[1]).norm() / reference[1].norm())
            q.grad = k.grad = v.grad = None
            row.update(_time_impl(fn, q, k, v, do, cell, device, warmup, rep))
            if key == OURS and device.type == "cuda":
                row.update(_graph_replay_ms(lambda: fn(q, k, v, sizes, cell.pattern, None), rep))
        except Exception as exc:  # an implementation that cannot run here is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log(f"  {label} @ {cell.res or n} {cell.pattern}: {row['error']}")
        q.grad = k.grad = v.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        if "error" not in row:
            log(f"  {cell.res or n} {cell.pattern:14s} {label:18s} " + " ".join(f"{key}={row[key]:.4g}" for key in TIMED))
    ours = next((r for r in rows if r["impl"] == IMPLS[OURS][0] and "fwd_ms" in r), None)
    if ours:
        for r in rows:
            for key in TIMED:
                if key in r:
                    r["ours_speedup_" + key[:-3]] = r[key] / ours[key]
    return rows


def environment(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "triton_interpreter": devices.INTERPRETING}


def run(cells: Sequence[Cell], impls: Sequence[str], device: torch.device, warmup: float = 25, rep: float = 100,
        log=print) -> dict:
    """Every cell with every implementation (ours first); returns {env, rows, autotuned}."""
    if "flex" in impls:
        _flex_setup()
    impls = sorted(impls, key=lambda key: key != OURS)
    rows = [row for cell in cells for row in run_cell(cell, impls, device, warmup, rep, log)]
    autotuned = {str(k): str(v) for k, v in picked_configs().items()}
    return {"env": environment(device), "rows": rows, "autotuned": autotuned}


def _shape_title(rows: list[dict]) -> str:
    shapes = sorted({f"{r['dtype']}, H={r['heads']}, D={r['head_dim']}" for r in rows})
    return "; ".join(shapes)


def print_table(rows: list[dict], env: dict | None = None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    where = f" — {env['device']}, torch {env['torch']}, triton {env['triton']}" if env else ""
    if env and env["triton_interpreter"]:
        where += " (ours under Triton's interpreter: a check, not a kernel time)"
    table = Table(title=f"Block-sparse attention ({_shape_title(rows)}){where}: median ms, useful TFLOP/s, ours' speedup")
    for col in ("res", "B", "pattern", "impl", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "f+b ms",
                "rel err", "ours × fwd", "ours × bwd", "ours × f+b"):
        table.add_column(col, justify="right" if col not in ("pattern", "impl") else "left")
    fmt = lambda r, k, f="{:.3f}": f.format(r[k]) if k in r else "-"  # noqa: E731
    for r in rows:
        res = str(r["res"] or f"N={r['tokens']}")
        if "error" in r:
            table.add_row(res, str(r["batch"]), r["pattern"], r["impl"], "not run (see below)", *["-"] * 8)
            continue
        table.add_row(res, str(r["batch"]), r["pattern"], r["impl"], fmt(r, "fwd_ms"), fmt(r, "fwd_tflops", "{:.3g}"),
                      fmt(r, "bwd_ms"), fmt(r, "bwd_tflops", "{:.3g}"), fmt(r, "fwd_bwd_ms"), fmt(r, "rel_err", "{:.1e}"),
                      fmt(r, "ours_speedup_fwd", "{:.2f}"), fmt(r, "ours_speedup_bwd", "{:.2f}"),
                      fmt(r, "ours_speedup_fwd_bwd", "{:.2f}"))
    console = console or Console(width=200)
    console.print(table)
    for note in sorted({f"{r['impl']}: {r['error']}" for r in rows if "error" in r}):
        console.print(f"not run: {note}", highlight=False)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hmar.kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, nargs="+", default=sorted(PATCH_NUMS), choices=sorted(PATCH_NUMS))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--json", metavar="PATH", help="write all rows and the environment as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("hmar.kernels.bench needs a CUDA device (`hmar bench attention` also runs small shapes on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(environment(device), flush=True)
    result = run(make_cells(args.res, args.patterns), args.impls, device, args.warmup, args.rep,
                 log=lambda s: print(s, flush=True))
    print_table(result["rows"])
    graph = [f"{r['res']}px {r['pattern']}: {r['fwd_graph_ms']:.3f}" for r in result["rows"] if "fwd_graph_ms" in r]
    print("ours, forward under CUDA-graph replay (GPU time, ms):", "; ".join(graph))
    print("autotuned configs:", json.dumps(result["autotuned"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
