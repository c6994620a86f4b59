"""Scale sizes (token-map side lengths) per image resolution, as VAR/HMAR use them (downsampling 16).

Here, at the bottom of the layers, so that the attention benchmark (kernels) and the model
configuration (engine) read one table; plain Python, so the CLI's --help reads it without torch.
"""

PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
