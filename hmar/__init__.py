"""hmar: Hierarchical Masked Auto-Regressive image generation and zero-shot editing.

    from hmar import Pipeline
    pipe = Pipeline.from_pretrained("hmar-d16")
    images = pipe.generate([207], steps=14, seed=0).images
"""
__version__ = "0.1.0"

__all__ = ["Pipeline", "ModelConfig", "HmarError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import hmar` (and the CLI's --help) does not import torch.
    if name == "Pipeline":
        from hmar.pipeline import Pipeline

        return Pipeline
    if name == "ModelConfig":
        from hmar.config import ModelConfig

        return ModelConfig
    if name == "HmarError":
        from hmar.errors import HmarError

        return HmarError
    raise AttributeError(f"module 'hmar' has no attribute {name!r}")
