"""The permissions a new output file should get.

Temporary files (tempfile.mkstemp, safetensors' writer) are created private to their owner; the
images and model folders hmar writes are meant to be shared, so once complete they get the mode an
ordinary new file would have: read/write as the user's umask allows.
"""
from __future__ import annotations

import os


def ordinary_file_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask
