"""`hmar bench` at CPU sizes: both families run, rows are consistent; `hmar bench attention` times the
baselines (and our kernel under Triton's interpreter); every bench command can draw a PNG chart; the
training step (the trainer's own, `hmar.train.benchmark`) can be compiled, compiles only while warming
up, and train / sample steps are profiled into categories that add up. The command-line tests run on
a tiny tokenizer (`tiny_presets`), so that they take seconds."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import hmar.benchmark
import hmar_cli.bench
from hmar.policy import KernelPolicy
from hmar.benchmark import Workload, bench_config, bench_sample, forward_flops, measure
from hmar.checkpoints import build_models
from hmar.config import TokenizerConfig
from hmar.profiling import CATEGORY_NAMES, OTHER, category_of
from hmar.train.benchmark import bench_train, stage1_objective, train_step_fn
from hmar.train.losses import scale_weights
from hmar.train.stage1 import MASK_BRANCH
from hmar_cli.app import app

TINY = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=(1, 2, 4), image_size=16)


@pytest.fixture
def tiny_presets(monkeypatch):
    """`hmar bench train|sample --resolution` builds TINY's tokenizer (the full 256 px one takes minutes on the CPU)."""
    monkeypatch.setattr(hmar_cli.bench, "tokenizer_preset", lambda resolution: TINY)


def test_train_benchmark_rows():
    rows = bench_train(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), warmup=1, iters=2)
    assert [r.family for r in rows] == ["hmar", "var"]
    for row in rows:
        assert row.median_ms > 0 and row.images_per_s > 0 and row.tflops > 0
    assert rows[1].ratio_vs_var == 1.0 and not any(r.compiled or r.cuda_graph for r in rows)  # the trainer's CPU defaults
    rows = bench_train(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), warmup=0, iters=1, loss="logits")
    assert all(r.median_ms > 0 for r in rows)


def test_the_training_step_leaves_hmars_mask_branch_alone():
    config = bench_config("hmar", 2, 64, TINY)
    work = train_step_fn(config, 2, torch.device("cpu"))
    params = [t for t in work.resident() if isinstance(t, torch.nn.Parameter)]
    before = [p.detach().clone() for p in params]
    work.step()
    frozen = [torch.equal(p, b) for p, b in zip(params, before) if not p.requires_grad]
    mask_branch = [p for name in MASK_BRANCH for p in getattr(build_models(config)[1], name).parameters()]
    assert len(frozen) == len(mask_branch) > 0 and all(frozen)
    assert any(not torch.equal(p, b) for p, b in zip(params, before) if p.requires_grad)


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_both_loss_paths_of_the_training_step_give_the_same_loss(family):
    config = bench_config(family, 2, 64, TINY)
    transformer = build_models(config)[1].eval()  # eval: no label dropout, both paths see the same labels
    L, first = sum(p * p for p in config.patch_nums), config.patch_nums[0] ** 2
    inputs = (torch.tensor([3, 5]), torch.randn(2, L - first, TINY.z_channels), torch.randint(0, TINY.vocab_size, (2, L)))
    weights = scale_weights("lognormal", config.patch_nums)
    chunked, logits = (stage1_objective(transformer, None, weights, path)(*inputs)[0] for path in ("chunked", "logits"))
    torch.testing.assert_close(chunked, logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="loss path"):
        stage1_objective(transformer, None, weights, "fused")


def test_sample_benchmark_rows():
    rows = bench_sample(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), steps=4, top_k=8, warmup=1, iters=1)
    assert {r.family for r in rows} == {"hmar", "var"} and all(r.median_ms > 0 for r in rows)


def test_sample_benchmark_of_named_models(conformance_models):
    names = [str(conformance_models["hmar"]), str(conformance_models["var"])]
    rows = bench_sample(TINY, depth=2, batch_size=2, device=torch.device("cpu"), steps=6, top_k=8, warmup=0, iters=1, models=names)
    assert [(r.model, r.family) for r in rows] == [(names[0], "hmar"), (names[1], "var")]
    assert rows[1].ratio_vs_var == 1.0 and rows[0].ratio_vs_var > 0 and not rows[0].compiled
    result = CliRunner().invoke(app, ["bench", "sample", "--model", names[0], "--batch-size", "1", "--steps", "6", "--warmup", "0",
                                      "--iters", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["shape"]["models"] == names[0] and [r["model"] for r in data["rows"]] == [names[0]]
    assert data["rows"][0]["ratio_vs_var"] is None  # no VAR model to compare with
    result = CliRunner().invoke(app, ["bench", "sample", "--model", "no-such-model", "--device", "cpu"])
    assert result.exit_code != 0 and "no-such-model" in result.output


def test_a_models_resident_memory_counts_shared_storage_once():
    weight = torch.zeros(10, 4)
    work = Workload(lambda: None, lambda: [weight, weight[:5], weight.T, torch.zeros(3, dtype=torch.float64)])
    assert work.resident_bytes() == 10 * 4 * 4 + 3 * 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_leaves_out_other_models_on_the_device():
    device = torch.device("cuda")
    big, small = torch.empty(2**28, device=device), torch.empty(2**20, device=device)  # 1 GiB, 4 MiB held

    def step():
        torch.empty(2**26, device=device).fill_(1)  # 256 MiB for the step

    _, peak = measure(Workload(step, lambda: [small]), device, warmup=1, iters=2)
    assert 0.25 <= peak < 0.3  # its 4 MiB and the step's 256 MiB, not the other 1 GiB
    del big


def test_block_diagonal_attention_does_less_work():
    hmar, var = (forward_flops(bench_config(f, 16, None, TokenizerConfig()), 1) for f in ("hmar", "var"))
    assert hmar < var


# ------------------------------------------------------------------ the command line

TINY_ATTENTION = ["bench", "attention", "--patch-nums", "1,2,3", "--batch-size", "2", "--heads", "2", "--head-dim", "16",
                  "--dtype", "fp32", "--device", "cpu", "--warmup", "0", "--rep", "1", "--json"]


def _rows_by_impl(stdout: str) -> dict:
    report = json.loads(stdout)
    assert report["environment"]["torch"] == torch.__version__
    return {(r["pattern"], r["impl"]): r for r in report["rows"]}


def test_bench_attention_times_the_baselines_on_the_cpu():
    result = CliRunner().invoke(app, TINY_ATTENTION)
    assert result.exit_code == 0, result.output
    rows = _rows_by_impl(result.stdout)
    assert set(rows) == {("block_diagonal", "triton (ours)"), ("block_diagonal", "sdpa + bool mask"),
                         ("block_diagonal", "sdpa per scale"), ("block_causal", "triton (ours)"), ("block_causal", "sdpa + bool mask")}
    for (pattern, impl), row in rows.items():
        assert row["tokens"] == 14 and row["batch"] == 2 and row["dtype"] == "float32"
        if impl == "triton (ours)" and not os.environ.get("TRITON_INTERPRET"):
            assert "CUDA" in row["error"] and "fwd_ms" not in row
        else:
            assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
            # one measurement window on the CPU (ROUNDS of them on the GPU); the reported time is their median
            assert row["fwd_windows_ms"] == [row["fwd_ms"]] and row["fwd_bwd_windows_ms"] == [row["fwd_bwd_ms"]]
    assert rows[("block_diagonal", "sdpa per scale")]["rel_err"] < 1e-5


def test_attention_bench_times_several_windows_and_settles(monkeypatch):
    import triton.testing

    from hmar.kernels import bench

    windows = iter([0.3, 0.1, 0.2])
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: next(windows))
    assert bench._time_ms(lambda: None, torch.device("cuda"), 1, 1) == [0.3, 0.1, 0.2]
    calls = []
    bench._settle(lambda: calls.append(1), torch.device("cpu"), 0.05)
    assert len(calls) > 1


def test_bench_attention_runs_our_kernel_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "hmar_cli", *TINY_ATTENTION], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = _rows_by_impl(result.stdout)
    for pattern in ("block_diagonal", "block_causal"):
        assert rows[(pattern, "triton (ours)")]["fwd_bwd_ms"] > 0
        assert rows[(pattern, "sdpa + bool mask")]["rel_err_vs"] == "triton (ours)"
        assert rows[(pattern, "sdpa + bool mask")]["rel_err"] < 1e-5


@pytest.mark.parametrize("command", [
    TINY_ATTENTION,
    ["bench", "train", "--depth", "1", "--width", "64", "--batch-size", "1", "--warmup", "0", "--iters", "1", "--device", "cpu"],
    ["bench", "sample", "--depth", "1", "--width", "64", "--batch-size", "1", "--steps", "4", "--warmup", "0", "--iters", "1", "--device", "cpu"],
], ids=["attention", "train", "sample"])
def test_bench_commands_draw_a_png_chart(tmp_path, tiny_presets, command):
    chart = tmp_path / "chart.png"
    result = CliRunner().invoke(app, [*command, "--chart", str(chart)])
    assert result.exit_code == 0, result.output
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width == 1000 and image.height > 100
        assert "median ms" in image.text["title"] and json.loads(image.text["environment"])["torch"] == torch.__version__
    again = CliRunner().invoke(app, [*command, "--chart", str(chart)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr  # refused before running anything
    assert CliRunner().invoke(app, [*command, "--chart", str(chart), "--overwrite"]).exit_code == 0


def test_bench_options_are_checked_before_running(tmp_path):
    for args, message in ((["attention", "--impl", "cudnn"], "--impl: cudnn"), (["attention", "--patch-nums", "1,0"], "--patch-nums"),
                          (["attention", "--dtype", "fp8"], "--dtype"), (["train", "--loss", "fused"], "--loss"),
                          (["train", "--compile-mode", "reduce-overhead"], "--compile-mode"),
                          (["train", "--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
                          (["sample", "--chart", str(tmp_path / "c.jpg")], ".png")):
        result = CliRunner().invoke(app, ["bench", *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


@pytest.mark.parametrize("args, message", [
    (["--resolution", "300"], "--resolution must be one of 256, 512, 1024, got 300"),
    (["--resolution", "512", "--steps", "9"], "steps must be between 10"),  # 512 px has 10 scales too
    (["--steps", "1000"], "steps must be between 10"),
    (["--model", "hmar-d16", "--depth", "30"], "--depth size the random models"),
    (["--model", "hmar-d16", "--resolution", "512", "--width", "64"], "--width, --resolution size the random models"),
], ids=["resolution", "steps-512", "steps-256", "model-depth", "model-sizes"])
def test_bench_sample_refuses_sizes_before_building_anything(tmp_path, args, message):
    profile = tmp_path / "profile"
    result = CliRunner().invoke(app, ["bench", "sample", *args, "--device", "cpu", "--profile", str(profile)])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert "Traceback" not in result.output and "note:" not in result.stderr and not profile.exists()


def test_bench_sample_refuses_a_batch_over_the_memory_budget_before_sampling(tiny_presets):
    """The whole batch is checked against the budget, not one image of it (the labels alone of this
    batch would take 8 GB)."""
    result = CliRunner().invoke(app, ["bench", "sample", "--depth", "1", "--width", "64", "--batch-size", str(10**9), "--steps", "4",
                                      "--warmup", "0", "--iters", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "a batch of 1000000000 images" in result.stderr, result.output


def test_bench_sample_sizes_the_random_models(monkeypatch):
    """--depth, --width and --resolution reach the random models (published shape: width 64·depth,
    head dim 64), and the JSON names the shape."""
    seen = {}

    def fake_bench_sample(tokenizer, depth, batch_size, device, width=None, **options):
        seen.update(resolution=tokenizer.image_size, patch_nums=tokenizer.patch_nums, depth=depth, batch=batch_size, width=width)
        config = bench_config("hmar", depth, width, tokenizer)
        seen["model_width"], seen["heads"] = config.transformer.width, config.transformer.num_heads
        return [hmar.benchmark.BenchRow("hmar", "sample", 10.0, 1.0, None, None, 1.0, model="hmar"),
                hmar.benchmark.BenchRow("var", "sample", 10.0, 1.0, None, None, 1.0, model="var")]

    monkeypatch.setattr(hmar.benchmark, "bench_sample", fake_bench_sample)
    result = CliRunner().invoke(app, ["bench", "sample", "--depth", "30", "--resolution", "512", "--batch-size", "16", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"resolution": 512, "patch_nums": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), "depth": 30, "batch": 16, "width": None,
                    "model_width": 1920, "heads": 30}
    shape = json.loads(result.stdout)["shape"]
    assert (shape["depth"], shape["resolution"], shape["batch"]) == (30, 512, 16) and "width" not in shape
    result = CliRunner().invoke(app, ["bench", "sample", "--device", "cpu", "--json"])  # the defaults: d16 at 256 px
    assert result.exit_code == 0 and (seen["depth"], seen["resolution"], seen["batch"]) == (16, 256, 64)


# ------------------------------------------------------------------ compiled steps and profiles

def _assert_breakdown_adds_up(breakdown: dict) -> None:
    categories = breakdown["categories"]
    assert set(categories) == set(CATEGORY_NAMES) and breakdown["total_ms"] > 0
    assert sum(c["ms"] for c in categories.values()) == pytest.approx(breakdown["total_ms"], rel=1e-9)
    assert sum(c["percent"] for c in categories.values()) == pytest.approx(100.0)


def test_compiled_training_step_compiles_only_while_warming_up_and_is_profiled(monkeypatch):
    from torch._dynamo.utils import counters

    timed = []  # Dynamo's count of compiled graphs around every timed step
    measure_one = hmar.benchmark.measure

    def counting(work, device, warmup, iters):
        graphs = counters["stats"]["unique_graphs"]
        result = measure_one(work, device, warmup, iters)
        timed.append((graphs, counters["stats"]["unique_graphs"]))
        return result

    monkeypatch.setattr(hmar.benchmark, "measure", counting)
    # Dynamo and AOTAutograd as with Inductor, without Inductor's code generation (tests/test_compile.py covers it)
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: compile_module(self, **options, backend="aot_eager"))
    torch._dynamo.reset()  # nothing compiled by an earlier test is reused
    start = counters["stats"]["unique_graphs"]
    rows = bench_train(TINY, depth=1, width=64, batch_size=2, device=torch.device("cpu"), warmup=0, iters=2, compile=True, profile=True)
    assert len(timed) == 2 * 2 and timed[0][0] > start  # the warm-up rounds compiled ...
    assert all(before == after for before, after in timed)  # ... and no timed step did
    for row in rows:
        assert row.compiled and row.profile is not None
        _assert_breakdown_adds_up(row.profile.breakdown)
        assert row.profile.breakdown["categories"]["matmul"]["ms"] > 0
        assert "Self CPU" in row.profile.table
        assert json.loads(json.dumps(row.as_dict()))["profile"] == row.profile.breakdown


@pytest.mark.parametrize("name, category", [
    ("aten::addmm", "matmul"), ("nvjet_tst_192x192_64x3_2x1_v_bz_TNT", "matmul"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
    ("triton_tem_fused_mm_3", "matmul"), ("_attn_bwd_dkdv", "attention"), ("pytorch_flash::flash_fwd_kernel", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("triton_red_fused__log_softmax_4", "loss/softmax"),
    ("triton_poi_fused_add_convert_element_type_mul_0", "element-wise/norm"), ("aten::native_layer_norm", "element-wise/norm"),
    ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"), ("aten::_foreach_norm", "optimizer"),
    ("sm90_xmma_fprop_implicit_gemm_f32f32", "vq-vae"), ("aten::upsample_bicubic2d", "vq-vae"),
    ("cub::DeviceRadixSortOnesweepKernel", "top-k/top-p/draw"), ("aten::embedding", OTHER),
    ("_partial_moments", "vq-vae"), ("_normalize_act", "vq-vae"), ("_add_bias", "vq-vae"),
    ("_cosine_qkv_bwd", "element-wise/norm"),
    ("_adaln_bwd", "element-wise/norm"),
])
def test_kernel_and_operator_names_fall_into_categories(name, category):
    assert category_of(name) == category


def test_bench_profile_writes_tables_and_breakdowns(tmp_path, tiny_presets):
    folder = tmp_path / "profiles"
    for task in ("train", "sample"):
        args = ["bench", task, "--depth", "1", "--width", "64", "--batch-size", "1", "--warmup", "0", "--iters", "1",
                "--device", "cpu", "--json", "--profile", str(folder)]
        if task == "sample":
            args += ["--steps", "4"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)["rows"]
        for row in rows:
            _assert_breakdown_adds_up(row["profile"])
            written = json.loads((folder / f"{task}_{row['family']}.json").read_text())
            assert written["categories"] == row["profile"]["categories"] and written["shape"]["depth"] == 1
            assert "Self CPU" in (folder / f"{task}_{row['family']}.txt").read_text()
        if task == "sample":
            assert rows[0]["profile"]["categories"]["vq-vae"]["ms"] > 0  # the decoder's convolutions
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 2 and "--overwrite" in again.stderr  # refused before running anything


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_training_step_trains_like_the_eager_one():
    """The whole step replayed as a CUDA graph (after its eager warm-up steps and the capture) moves
    the weights as eager steps do, and its graph pool counts as held memory. (Eager AdamW keeps its
    step count on the host, the capturable one on the device: bias corrections may differ in the
    last bits.)"""
    device, config = torch.device("cuda"), bench_config("hmar", 2, 128, TINY)
    works = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        works[graphed] = train_step_fn(config, 4, device, KernelPolicy.choose(device, training=True, compile=True, cuda_graph=graphed))
        for _ in range(6):
            works[graphed].step()
    torch.cuda.synchronize()
    eager, replayed = ([t for t in works[g].resident() if isinstance(t, torch.nn.Parameter)] for g in (False, True))
    assert len(eager) == len(replayed) > 0
    for a, b in zip(eager, replayed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert works[True].held_bytes() > 0 and works[False].held_bytes() == 0
    rows = bench_train(TINY, depth=2, width=128, batch_size=4, device=device, warmup=0, iters=2, cuda_graph=True)
    assert all(r.cuda_graph and r.median_ms > 0 and r.peak_memory_gib > 0 for r in rows)
