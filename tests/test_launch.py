"""hmar.kernels.launch: a compiled binary is launched again directly only where Triton would pick the
same binary (same scalars; tensor dtypes, devices and 16-byte alignment; constexprs and compile
options), and only where this Triton has the internals the direct launch uses. A fake kernel stands in
for Triton's (CPU; the real launches run in the GPU kernel tests)."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch


class _Binary:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


class _Kernel:
    """What `launch` uses of a JITFunction: `fn` (the Python function) and ``kernel[grid](...)``,
    which returns the binary it launched."""

    def __init__(self):
        self.compiled = []

    @staticmethod
    def fn(X, n, scale, BLOCK, MODE=0):
        pass

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            binary = _Binary()
            self.compiled.append((grid, args, kwargs, binary))
            return binary
        return run


@pytest.fixture
def launching(monkeypatch):
    devices = importlib.import_module("hmar.kernels.devices")
    module = importlib.import_module("hmar.kernels.launch")
    monkeypatch.setattr(devices, "INTERPRETING", False)
    monkeypatch.setattr(module, "_binaries", {})
    monkeypatch.setattr(module, "_direct", True)
    return module.launch


def test_same_key_launches_the_kept_binary_with_every_parameter(launching):
    kernel, x = _Kernel(), torch.zeros(64)
    launching(kernel, (4,), (x, 32, 0.5), {"BLOCK": 16, "num_warps": 4})
    launching(kernel, (5,), (torch.ones(64), 32, 0.5), {"BLOCK": 16, "num_warps": 4})  # other data, other grid
    assert len(kernel.compiled) == 1
    grid, args, kwargs, binary = kernel.compiled[0]
    assert grid == (4,) and args == (x, 32, 0.5) and kwargs == {"BLOCK": 16, "num_warps": 4}
    # the binary's launcher gets a 3-d grid and all parameters in order, defaults filled in, options left out
    ((grid, args),) = binary.launches
    assert grid == (5, 1, 1) and args[1:] == (32, 0.5, 16, 0) and torch.equal(args[0], torch.ones(64))


@pytest.mark.parametrize("change", ["int", "float", "alignment", "dtype", "constexpr", "option"])
def test_a_different_specialisation_goes_through_triton(launching, change):
    kernel, x = _Kernel(), torch.zeros(64)
    launching(kernel, (4,), (x, 32, 0.5), {"BLOCK": 16, "num_warps": 4})
    args, kwargs = [x, 32, 0.5], {"BLOCK": 16, "num_warps": 4}
    if change == "int":
        args[1] = 33
    elif change == "float":
        args[2] = 0.7
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    else:
        kwargs["num_warps"] = 8
    launching(kernel, (4,), tuple(args), kwargs)
    assert len(kernel.compiled) == 2 and not kernel.compiled[0][3].launches


def test_the_interpreter_always_goes_through_triton(launching, monkeypatch):
    monkeypatch.setattr(importlib.import_module("hmar.kernels.devices"), "INTERPRETING", True)
    kernel, x = _Kernel(), torch.zeros(64)
    for _ in range(2):
        launching(kernel, (4,), (x, 32, 0.5), {"BLOCK": 16})
    assert len(kernel.compiled) == 2


def test_the_installed_triton_has_what_the_direct_launch_uses():
    assert importlib.import_module("hmar.kernels.launch").direct_launch_supported()


@pytest.mark.parametrize("missing", ["grid launcher", "launch metadata", "run keywords", "triton"])
def test_without_tritons_internals_every_call_goes_through_triton(launching, monkeypatch, missing):
    import triton.compiler
    import triton.runtime.jit

    module = importlib.import_module("hmar.kernels.launch")
    if missing == "grid launcher":
        monkeypatch.delattr(triton.compiler.CompiledKernel, "__getitem__")
    elif missing == "launch metadata":
        monkeypatch.delattr(triton.compiler.CompiledKernel, "launch_metadata")
    elif missing == "run keywords":
        monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", lambda self, *args, **kwargs: None)
    else:
        monkeypatch.setitem(sys.modules, "triton.compiler", None)  # importing it raises ImportError
    monkeypatch.setattr(module, "_direct", None)  # decided again, once, on the next launch
    kernel, x = _Kernel(), torch.zeros(64)
    for _ in range(3):
        launching(kernel, (4,), (x, 32, 0.5), {"BLOCK": 16})
    assert module._direct is False and not module._binaries
    assert len(kernel.compiled) == 3 and all(not binary.launches for *_, binary in kernel.compiled)


@pytest.fixture
def keeping(launching):
    return importlib.import_module("hmar.kernels.launch").launch_and_keep


def test_a_kept_launch_replaces_the_head_and_binds_the_rest(keeping):
    kernel, x = _Kernel(), torch.zeros(64)
    again = keeping(kernel, (4,), (x, 32, 0.5), {"BLOCK": 16, "num_warps": 4}, 1)
    ((grid, args, kwargs, binary),) = kernel.compiled  # launched once now, through Triton
    assert grid == (4,) and args == (x, 32, 0.5) and kwargs == {"BLOCK": 16, "num_warps": 4} and not binary.launches
    y = torch.ones(64)
    again(y)
    again(x)
    assert len(kernel.compiled) == 1  # no dispatch again
    # the binary's launcher: the new head, the bound scalars, constexprs and defaults in order, no options
    assert [(g, a[0] is t, a[1:]) for (g, a), t in zip(binary.launches, (y, x))] == [((4, 1, 1), True, (32, 0.5, 16, 0))] * 2


@pytest.mark.parametrize("why", ["interpreter", "no internals"])
def test_a_kept_launch_goes_through_triton_where_the_direct_launch_cannot(keeping, monkeypatch, why):
    module = importlib.import_module("hmar.kernels.launch")
    if why == "interpreter":
        monkeypatch.setattr(importlib.import_module("hmar.kernels.devices"), "INTERPRETING", True)
    else:
        monkeypatch.setattr(module, "_direct", False)
    kernel, x, y = _Kernel(), torch.zeros(64), torch.ones(64)
    again = keeping(kernel, (4,), (x, 32, 0.5), {"BLOCK": 16}, 1)
    again(y)
    assert [(g, a[0] is t, a[1:], kw) for (g, a, kw, _), t in zip(kernel.compiled, (x, y))] == \
        [((4,), True, (32, 0.5), {"BLOCK": 16})] * 2
    assert not any(binary.launches for *_, binary in kernel.compiled)
