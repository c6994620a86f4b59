"""The kernel policy (`hmar.policy.KernelPolicy`): what `choose` decides for each device, mode and flag
(CUDA as a device object: no GPU needed), that the models run what their policy says and decide
nothing in a forward (fake kernels stand in for the Triton ones, on CPU tensors), and where the
policy is shown: `hmar env`, image metadata, benchmark JSON."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import hmar.policy
from hmar.config import ModelConfig
from hmar.outputs import read_metadata
from hmar.pipeline import Pipeline
from hmar.policy import KernelPolicy
from hmar_cli.app import app
from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

CUDA = torch.device("cuda")  # a device object only: choose() asks nothing of the GPU
runner = CliRunner()


@pytest.fixture
def triton(monkeypatch):
    """Whether the kernels import: set by the test instead of trying Triton."""
    def set_available(available: bool) -> None:
        monkeypatch.setattr(hmar.policy, "triton_available", lambda: available)
    return set_available


# ---- choose ----------------------------------------------------------------------------------------
def test_the_cpu_defaults_are_the_reference():
    for training in (False, True):
        assert KernelPolicy.choose("cpu", training=training) == KernelPolicy.reference()
    assert KernelPolicy.reference().compact() == "reference"
    compiled = KernelPolicy.choose("cpu", training=True, compile=True)
    assert compiled.compile and compiled == KernelPolicy(compile=True) and compiled.compact() == "compile"
    assert not KernelPolicy.choose("cpu", training=False, cuda_graph=True).cuda_graph  # sampling replays only on CUDA


def test_cuda_sampling_eagerly_takes_every_fast_path(triton):
    triton(True)
    policy = KernelPolicy.choose(CUDA, training=False)
    assert policy == KernelPolicy(attention="block_sparse", fused_adaln=True, fused_cosine_qkv=True, gelu_epilogue=True,
                                  fused_draw=True, channels_last_decoder=True, decoder_dtype=torch.float16,
                                  amp_dtype=torch.bfloat16, compile=False, cuda_graph=True)
    assert not KernelPolicy.choose(CUDA, training=False, cuda_graph=False).cuda_graph


def test_compiled_cuda_sampling_leaves_the_blocks_to_inductor(triton):
    triton(True)
    policy = KernelPolicy.choose(CUDA, training=False, compile=True)
    assert policy.compile and not (policy.fused_adaln or policy.fused_cosine_qkv or policy.gelu_epilogue)
    assert policy.channels_last_decoder and policy.decoder_dtype == torch.float16  # the decoder stays eager


def test_cuda_training_keeps_the_kernels_compiled_or_not(triton):
    triton(True)
    policy = KernelPolicy.choose(CUDA, training=True)
    assert policy == KernelPolicy(attention="block_sparse", fused_adaln=True, fused_cosine_qkv=True, amp_dtype=torch.bfloat16,
                                  compile=True, cuda_graph=True)
    eager = KernelPolicy.choose(CUDA, training=True, compile=False)
    assert not eager.compile and eager.fused_adaln and eager.fused_cosine_qkv
    assert not KernelPolicy.choose(CUDA, training=True, world_size=2).cuda_graph  # one process only
    assert KernelPolicy.choose(CUDA, training=True, precision="fp32").amp_dtype is None
    assert KernelPolicy.choose("cpu", training=True, precision="bf16").amp_dtype == torch.bfloat16
    assert KernelPolicy.choose(CUDA, training=True, attention="masked_sdpa").attention == "masked_sdpa"


def test_without_triton_cuda_keeps_only_what_needs_no_triton(triton):
    triton(False)
    sampling = KernelPolicy.choose(CUDA, training=False)
    assert sampling == KernelPolicy(gelu_epilogue=True, decoder_dtype=torch.float16, amp_dtype=torch.bfloat16, cuda_graph=True)
    training = KernelPolicy.choose(CUDA, training=True)
    assert training.attention == "per_scale_sdpa" and not (training.fused_adaln or training.fused_cosine_qkv)


def test_triton_that_does_not_import_is_asked_once(monkeypatch):
    hmar.policy.triton_available.cache_clear()
    monkeypatch.setitem(sys.modules, "hmar.kernels.block_sparse_attention", None)  # import raises ImportError
    try:
        assert hmar.policy.triton_available() is False
    finally:
        hmar.policy.triton_available.cache_clear()


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        KernelPolicy.choose("cpu", training=True, attention="flash")
    with pytest.raises(ValueError, match="precision must be one of"):
        KernelPolicy.choose("cpu", training=True, precision="fp8")


def test_as_dict_is_json_and_reads_back(triton):
    triton(True)
    policy = KernelPolicy.choose(CUDA, training=False)
    values = json.loads(json.dumps(policy.as_dict()))
    assert values["decoder_dtype"] == "float16" and values["amp_dtype"] == "bfloat16" and values["fused_adaln"] is True
    assert KernelPolicy.from_dict(values) == policy
    assert policy.compact().split(",") == ["attention=block_sparse", "fused_adaln", "fused_cosine_qkv", "gelu_epilogue",
                                           "fused_draw", "channels_last_decoder", "decoder_dtype=float16", "amp_dtype=bfloat16", "cuda_graph"]


# ---- the models run what their policy says ----------------------------------------------------------
def _layer_norm(x, scale, shift, eps, dtype):
    return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift).to(dtype)


def _fake_kernels(calls: dict) -> dict[str, types.ModuleType]:
    """Stand-ins for hmar.kernels.adaln, .cosine_qkv and .channels_last: PyTorch's ops (the same
    functions), taking any tensor and counting their calls."""
    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return function(*args, **kwargs)
        return wrapper

    def residual_norm(x, h, gamma, scale, shift, eps, dtype):
        x = x + h * gamma
        return x, _layer_norm(x, scale, shift, eps, dtype)

    def cosine_qkv(qkv, log_scale, max_log):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        temperature = log_scale.reshape(1, -1, 1, 1).clamp_max(max_log).exp()
        return F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1), v

    def group_norm(x, groups, weight, bias, eps, silu, shift=None, moments=None):
        y = F.group_norm(x if shift is None else x + shift.view(-1, 1, 1), groups, weight, bias, eps)
        return (F.silu(y) if silu else y).contiguous(memory_format=torch.channels_last)

    def add_bias_(y, bias, residual=None, moments=False):
        y.add_(bias.view(-1, 1, 1))
        y = y if residual is None else y.add_(residual)
        return (y, None) if moments else y  # (no moments: the norm computes its own statistics)

    def interleave_phases(phases, bias, moments=False):
        # output pixel (2i + a, 2j + b) is phase 2a + b's pixel (i + a, j + b) (hmar.tokenizer_modules.upsample_weight)
        N, C4, H1, W1 = phases.shape
        C, H, W = C4 // 4, H1 - 1, W1 - 1
        out = phases.new_empty(N, C, 2 * H, 2 * W)
        for a in (0, 1):
            for b in (0, 1):
                p = 2 * a + b
                out[:, :, a::2, b::2] = phases[:, p * C:(p + 1) * C, a:a + H, b:b + W]
        out = (out + bias.view(-1, 1, 1)).contiguous(memory_format=torch.channels_last)
        return (out, None) if moments else out

    always = lambda *args: True  # noqa: E731
    return {
        "adaln": types.SimpleNamespace(supports=always, modulated_layer_norm=counted("modulated", _layer_norm),
                                       residual_modulated_layer_norm=counted("residual", residual_norm)),
        "cosine_qkv": types.SimpleNamespace(supports=always, cosine_qkv=counted("cosine_qkv", cosine_qkv)),
        "channels_last": types.SimpleNamespace(supports=lambda x: x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last),
                                               group_norm=counted("group_norm", group_norm), add_bias_=counted("add_bias_", add_bias_),
                                               interleave_phases=counted("interleave_phases", interleave_phases)),
    }


@pytest.fixture
def fake_kernels(monkeypatch):
    import hmar.kernels

    calls: dict[str, int] = {}
    for name, module in _fake_kernels(calls).items():
        monkeypatch.setitem(sys.modules, f"hmar.kernels.{name}", module)
        monkeypatch.setattr(hmar.kernels, name, module, raising=False)
    return calls


@pytest.fixture
def pipe():
    return Pipeline.random(ModelConfig(tiny_tokenizer_config(), tiny_transformer_config()), device="cpu", seed=0)


def _logits(model, train: bool):
    model.train(train)
    labels = torch.tensor([1, 3])
    teacher = torch.randn(2, sum(model.block_sizes[1:]), model.z_channels, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(train):
        return model.forward_next_scale(labels, teacher)


@pytest.mark.parametrize("train", [False, True], ids=["sampling", "training"])
def test_a_cpu_model_calls_the_kernels_its_policy_names(fake_kernels, pipe, train):
    """Nothing in a forward looks at the device, gradients or compilation: on CPU tensors, with or
    without gradients, the kernels run exactly where the policy turned them on."""
    model = pipe.transformer
    assert model.policy.is_reference
    reference = _logits(model, train)
    assert fake_kernels == {}
    model.set_policy(KernelPolicy(fused_adaln=True, fused_cosine_qkv=True))
    fused = _logits(model, train)
    blocks = len(model.base_blocks) + len(model.ns_blocks)
    assert fake_kernels == {"modulated": blocks + 1, "residual": blocks, "cosine_qkv": blocks}  # + the head's norm
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    model.set_policy(KernelPolicy(fused_adaln=True))
    fake_kernels.clear()
    _logits(model, train)
    assert fake_kernels == {"modulated": blocks + 1, "residual": blocks}


def test_the_gelu_epilogue_runs_where_the_policy_says(pipe, monkeypatch):
    calls = []
    epilogue = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *args, **kwargs: calls.append(1) or epilogue(*args, **kwargs))
    model = pipe.transformer
    _logits(model, False)
    assert calls == []
    model.set_policy(KernelPolicy(gelu_epilogue=True))
    _logits(model, False)
    assert len(calls) == len(model.base_blocks) + len(model.ns_blocks)


def test_a_pipeline_samples_with_the_policy_it_is_given(fake_kernels):
    config = ModelConfig(tiny_tokenizer_config(), tiny_transformer_config())
    reference = Pipeline.random(config, device="cpu", seed=0)
    policy = KernelPolicy(fused_adaln=True, fused_cosine_qkv=True, channels_last_decoder=True)
    fused = Pipeline.random(config, device="cpu", seed=0, kernels=policy)
    assert reference.policy.is_reference and fused.policy == policy
    assert fused.tokenizer.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fake_kernels == {}
    got, expected = (p.generate([1, 2], seed=0, top_k=8) for p in (fused, reference))
    assert all(fake_kernels.get(name, 0) > 0 for name in ("modulated", "residual", "cosine_qkv", "group_norm", "add_bias_", "interleave_phases"))
    torch.testing.assert_close(got.images, expected.images, rtol=1e-4, atol=1e-4)


# ---- shown where a user looks ----------------------------------------------------------------------
def test_env_prints_the_policies():
    info = json.loads(runner.invoke(app, ["env", "--json"]).stdout)
    assert set(info["kernels"]) == {"sampling", "training"}
    for mode, values in info["kernels"].items():
        assert KernelPolicy.from_dict(values) == KernelPolicy.choose(info["device"]["default"], training=mode == "training")
    assert info["triton"]["kernels"] == hmar.policy.triton_available() and info["triton"]["direct_launch"] in (True, False, None)
    text = runner.invoke(app, ["env"], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and "kernels (sampling)" in text.stdout and "kernels (training)" in text.stdout
    assert "Triton kernels" in text.stdout


def test_generated_images_record_the_policy_and_reference_can_be_asked_for(tmp_path, conformance_models):
    model = str(conformance_models["hmar"])
    args = ["generate", "--model", model, "--class", "1", "--seed", "4", "--top-k", "8", "--device", "cpu"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "auto.png")]).exit_code == 0
    result = runner.invoke(app, [*args, "--kernels", "reference", "--out", str(tmp_path / "ref.jpg"), "--json"])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "auto.png")["hmar:kernels"] == "reference"  # the CPU's default
    assert read_metadata(tmp_path / "ref.jpg")["hmar:kernels"] == "reference"
    assert json.loads(result.stdout)["kernels"] == "reference"


@pytest.mark.parametrize("extra, message", [
    (["--kernels", "fast"], "--kernels must be one of auto, reference, got 'fast'"),
    (["--kernels", "reference", "--compile"], "--kernels reference runs PyTorch's ops eagerly; drop --compile"),
])
def test_bad_kernels_options_are_usage_errors(tmp_path, extra, message):
    result = runner.invoke(app, ["generate", "--class", "1", "--device", "cpu", "--out", str(tmp_path / "x.png"), *extra])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "x.png").exists()
    bench = runner.invoke(app, ["bench", "train", "--device", "cpu", *extra, "--cuda-graph"])
    assert bench.exit_code == 2 and bench.stderr.strip().startswith(f"error: {message.removesuffix('--compile')}")


def test_bench_json_and_charts_record_the_policy(monkeypatch, tmp_path):
    import hmar_cli.bench

    monkeypatch.setattr(hmar_cli.bench, "tokenizer_preset", lambda resolution: tiny_tokenizer_config())
    for task in ("train", "sample"):
        args = ["bench", task, "--depth", "1", "--width", "32", "--batch-size", "1", "--iters", "1", "--warmup", "0", "--device", "cpu", "--json",
                "--chart", str(tmp_path / f"{task}.png")]
        if task == "sample":
            args += ["--steps", "4"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["kernels"] == KernelPolicy.reference().as_dict()
        assert all(row["kernels"] == report["kernels"] for row in report["rows"])
        assert json.loads(read_metadata(tmp_path / f"{task}.png")["kernels"]) == report["kernels"]
    attention = runner.invoke(app, ["bench", "attention", "--patch-nums", "1,2", "--batch-size", "1", "--heads", "1", "--head-dim", "16",
                                    "--dtype", "fp32", "--device", "cpu", "--warmup", "0", "--rep", "1", "--impl", "sdpa-per-scale", "--json"])
    assert attention.exit_code == 0, attention.output
    assert json.loads(attention.stdout)["kernels"]["attention"] == "per_scale_sdpa"
