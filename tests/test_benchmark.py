"""`hmar bench` internals at CPU sizes: both families run, rows are consistent."""
import torch

from hmar.benchmark import bench_config, bench_sample, bench_train, forward_flops
from hmar.config import TokenizerConfig

TINY = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=(1, 2, 4), image_size=16)


def test_train_benchmark_rows():
    rows = bench_train(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), warmup=1, iters=2)
    assert [r.family for r in rows] == ["hmar", "var"]
    for row in rows:
        assert row.median_ms > 0 and row.images_per_s > 0 and row.tflops > 0
    assert rows[1].ratio_vs_var == 1.0


def test_sample_benchmark_rows():
    rows = bench_sample(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), steps=4, top_k=8, warmup=1, iters=1)
    assert {r.family for r in rows} == {"hmar", "var"} and all(r.median_ms > 0 for r in rows)


def test_block_diagonal_attention_does_less_work():
    hmar, var = (forward_flops(bench_config(f, 16, None, TokenizerConfig()), 1) for f in ("hmar", "var"))
    assert hmar < var
