"""`hmar bench` internals at CPU sizes: both families run, rows are consistent."""
import pytest
import torch

from hmar.attention import select_attention
from hmar.benchmark import bench_config, bench_sample, bench_train, forward_flops, stage1_loss_fn
from hmar.checkpoints import build_models
from hmar.config import TokenizerConfig
from hmar.train.losses import scale_weights

TINY = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), patch_nums=(1, 2, 4), image_size=16)


def test_train_benchmark_rows():
    rows = bench_train(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), warmup=1, iters=2)
    assert [r.family for r in rows] == ["hmar", "var"]
    for row in rows:
        assert row.median_ms > 0 and row.images_per_s > 0 and row.tflops > 0
    assert rows[1].ratio_vs_var == 1.0
    rows = bench_train(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), warmup=0, iters=1, loss="logits")
    assert all(r.median_ms > 0 for r in rows)


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_both_loss_paths_of_the_training_step_give_the_same_loss(family):
    config = bench_config(family, 2, 64, TINY)
    transformer = build_models(config)[1].eval()  # eval: no label dropout, both paths see the same labels
    L, first = sum(p * p for p in config.patch_nums), config.patch_nums[0] ** 2
    inputs = (torch.tensor([3, 5]), torch.randn(2, L - first, TINY.z_channels), torch.randint(0, TINY.vocab_size, (2, L)))
    weights = scale_weights("lognormal", config.patch_nums)
    chunked, logits = (stage1_loss_fn(transformer, select_attention("auto"), weights, path)(*inputs) for path in ("chunked", "logits"))
    torch.testing.assert_close(chunked, logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="loss path"):
        stage1_loss_fn(transformer, select_attention("auto"), weights, "fused")


def test_sample_benchmark_rows():
    rows = bench_sample(TINY, depth=2, width=64, batch_size=2, device=torch.device("cpu"), steps=4, top_k=8, warmup=1, iters=1)
    assert {r.family for r in rows} == {"hmar", "var"} and all(r.median_ms > 0 for r in rows)


def test_block_diagonal_attention_does_less_work():
    hmar, var = (forward_flops(bench_config(f, 16, None, TokenizerConfig()), 1) for f in ("hmar", "var"))
    assert hmar < var
