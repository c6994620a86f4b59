"""Regional compilation (hmar.compile): compiled blocks compute what eager blocks do, in the model and
in a training run."""
from __future__ import annotations

import torch

from hmar.attention import per_scale_sdpa
from hmar.compile import compile_blocks, eager
from hmar.config import ModelConfig
from hmar.pipeline import Pipeline
from hmar.train import Stage1Config, run_stage1
from hmar.train.metrics import read_metrics
from tests.train_helpers import make_data, make_tokenizer_folder, quiet, tiny_tokenizer_config, tiny_transformer_config


def test_compiled_blocks_give_the_eager_logits_and_gradients():
    # attention as an opaque call, as the Triton kernel's custom operator is on CUDA (test_kernels
    # compiles the blocks with the kernel itself, under the interpreter)
    opaque_attention = torch.compiler.disable(per_scale_sdpa)
    pipe = Pipeline.random(ModelConfig(tiny_tokenizer_config(), tiny_transformer_config()), device="cpu", seed=0)
    model = pipe.transformer.train()
    labels = torch.tensor([1, 3])
    teacher = torch.randn(2, sum(model.block_sizes[1:]), pipe.tokenizer.config.z_channels)  # f̂ inputs of scales 1…K-1

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as training on CUDA runs
            logits = model.forward_next_scale(labels, teacher, opaque_attention).float()
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference, reference_grads = run()
    assert compile_blocks(model) == len(model.base_blocks) + len(model.ns_blocks) + len(model.mask_blocks) + 2
    logits, grads = run()
    # bf16: fused and unfused element-wise code round differently
    torch.testing.assert_close(logits, reference, rtol=2e-2, atol=2e-2)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=5e-2, atol=5e-3)
    with eager():  # other shapes run without recompiling
        model.forward_next_scale(labels[:1], teacher[:1], opaque_attention)


def test_a_compiled_training_run_logs_the_eager_losses(tmp_path):
    data, tokenizer = make_data(tmp_path / "data"), make_tokenizer_folder(tmp_path / "tokenizer")
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled_{compiled}"
        run_stage1(Stage1Config(data=data, out=out, tokenizer=tokenizer, model=tiny_transformer_config(), steps=3, compile=compiled, **quiet()))
        losses[compiled] = [r["loss"] for r in read_metrics(out)]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5)


def test_compile_caches_are_tagged_with_the_kernels_sources(tmp_path):
    # torch.compile's on-disk caches do not see a custom operator's implementation: a graph cached
    # against an older fake implementation would be reused. The tag changes with every kernel source.
    import shutil
    from pathlib import Path

    import hmar.kernels
    from hmar.compile import kernels_fingerprint, tag_compile_caches

    copy = tmp_path / "kernels"
    shutil.copytree(Path(hmar.kernels.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert kernels_fingerprint(copy) == kernels_fingerprint()
    (copy / "cosine_qkv.py").write_text((copy / "cosine_qkv.py").read_text() + "\n# another layout\n")
    assert kernels_fingerprint(copy) != kernels_fingerprint()

    ours = f"hmar-kernels-{kernels_fingerprint()}"
    with torch.compiler.config.patch(cache_key_tag=""):
        compile_blocks(torch.nn.Linear(2, 2))
        assert torch.compiler.config.cache_key_tag == ours
        assert tag_compile_caches() == ours  # once
    with torch.compiler.config.patch(cache_key_tag="users"):
        assert tag_compile_caches() == f"users+{ours}"
