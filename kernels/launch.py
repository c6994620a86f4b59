"""Launching a Triton kernel again without Triton's per-call dispatch.

``kernel[grid](*args, **kwargs)`` binds the arguments, specialises them (dtypes, 16-byte alignment of
pointers, ints equal to 1 or divisible by 16), turns that into a cache key and looks the compiled
binary up, all in Python on every call: for kernels that run for microseconds on the GPU, eager
callers are bound by it (BENCHMARKS.md has the host cost per call).

`launch` keeps the binary that Triton's own launch returned, under a key that decides at least as
much as Triton's specialisation does: the exact value of every scalar, the dtype, device and
16-byte alignment of every tensor, the constexprs and the compile options (in the caller's order).
A later call with the same key calls the binary's own launcher (what Triton's dispatch ends in, with
the same arguments: every parameter in order, constexprs included). A new key goes through Triton,
which compiles when it must. Under the interpreter every call goes through Triton.

`launch_and_keep` serves a caller that knows its next calls will have the same specialisation (a
plan per input shape): it launches once through Triton and returns a function that launches that
binary again with new values for the leading (tensor) arguments, every other argument bound, with
no key to build or look up.

The direct launch relies on Triton internals (`JITFunction.fn`, `CompiledKernel.__getitem__`, the
launcher's argument order), which the pinned Triton range has; where they are missing every call goes
through ``kernel[grid]`` (checked once per process, `direct_launch_supported`).
"""
from __future__ import annotations

import inspect

import torch

from . import devices

_MAX_BINARIES = 4096  # distinct (kernel, shapes, alignments, options); cleared when full
_binaries: dict = {}
_parameters: dict = {}  # kernel -> (parameter names, defaults)
_direct: bool | None = None  # whether this Triton has what the direct launch uses; decided on first use


def direct_launch_supported() -> bool:
    """Whether this Triton's compiled kernels can be launched directly: its `CompiledKernel` has the
    grid launcher and launch metadata, and `JITFunction.run` takes the grid and warm-up flag as
    keywords (the dispatch whose end the direct launch repeats)."""
    try:
        from triton.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    if not (callable(getattr(CompiledKernel, "__getitem__", None)) and callable(getattr(CompiledKernel, "launch_metadata", None))):
        return False
    run = getattr(JITFunction, "run", None)
    try:
        params = inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False
    return all(params.get(name) is not None and params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in ("grid", "warmup"))


def _signature_of(kernel):
    found = _parameters.get(kernel)
    if found is None:
        params = inspect.signature(kernel.fn).parameters
        found = (tuple(params), {name: p.default for name, p in params.items() if p.default is not p.empty})
        _parameters[kernel] = found
    return found


def launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``; `kwargs` holds the constexprs and compile options."""
    global _direct
    if _direct is None:
        _direct = direct_launch_supported()
    if devices.INTERPRETING or not _direct:
        kernel[grid](*args, **kwargs)
        return
    # Tensors by dtype, device and 16-byte alignment; everything else by value (ints exactly: finer
    # than Triton's ==1 / %16 / width classes; floats too, which Triton does not specialise on).
    key = (kernel, tuple((a.dtype, a.device, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                         for a in args), tuple(kwargs.items()))
    binary = _binaries.get(key)
    if binary is None:
        binary = kernel[grid](*args, **kwargs)
        if hasattr(binary, "result"):  # an asynchronous compilation's future
            binary = binary.result()
        if len(_binaries) >= _MAX_BINARIES:
            _binaries.clear()
        _binaries[key] = binary
        return
    names, defaults = _signature_of(kernel)
    bound = list(args)
    for name in names[len(args):]:
        bound.append(kwargs[name] if name in kwargs else defaults[name])
    binary[tuple(grid) + (1,) * (3 - len(grid))](*bound)


def launch_and_keep(kernel, grid: tuple, args: tuple, kwargs: dict, head: int):
    """``kernel[grid](*args, **kwargs)`` now; returns ``again(*new_head)``, the same launch with
    `new_head` in place of ``args[:head]`` and every other argument as given.

    The caller promises that each later head has what Triton specialised the first on: the same
    dtypes and devices, and 16-byte alignment wherever the first head's tensors had it (plus its
    exact int values, for ints in the head). Under the interpreter, or where this Triton lacks the
    internals, `again` goes through ``kernel[grid]`` every time.
    """
    global _direct
    if _direct is None:
        _direct = direct_launch_supported()
    tail = tuple(args[head:])
    if devices.INTERPRETING or not _direct:
        kernel[grid](*args, **kwargs)
        return lambda *new_head: kernel[grid](*new_head, *tail, **kwargs)
    binary = kernel[grid](*args, **kwargs)
    if hasattr(binary, "result"):  # an asynchronous compilation's future
        binary = binary.result()
    names, defaults = _signature_of(kernel)
    tail += tuple(kwargs[name] if name in kwargs else defaults[name] for name in names[len(args):])
    runner = binary[tuple(grid) + (1,) * (3 - len(grid))]
    return lambda *new_head: runner(*new_head, *tail)
