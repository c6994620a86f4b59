"""What `hmar` imports to start: help and argument errors load no engine, a CPU run no Triton.

Each case runs the CLI in a fresh interpreter and reads which of the costly modules ended up in
`sys.modules`; a structural check, independent of the machine's speed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# torch and OpenCV take seconds to import; Triton, the trainer and the benchmarks more on top. The
# hmar.kernels package and its scale table are plain Python (hmar.config reads the table); every
# kernel module imports torch or Triton, so the first two names catch those.
COSTLY = ("torch", "cv2", "triton", "hmar.train", "hmar.benchmark", "hmar.pipeline")

RUN_AND_LIST = textwrap.dedent("""
    import json, sys
    from hmar_cli.app import main
    sys.argv = ["hmar", *sys.argv[1:]]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    print(json.dumps({"code": code, "loaded": [name for name in COSTLY if name in sys.modules]}))
""")


def loaded_by(*args: str) -> tuple[int, list[str]]:
    """Exit code of `hmar ARGS` and the costly modules it imported."""
    script = f"COSTLY = {COSTLY!r}\n{RUN_AND_LIST}"
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert result.stdout.strip(), result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return summary["code"], summary["loaded"]


@pytest.mark.parametrize("args", [
    ["--help"], ["generate", "--help"], ["edit", "--help"], ["inpaint", "--help"], ["outpaint", "--help"],
    ["train", "--help"], ["train", "stage1", "--help"], ["bench", "--help"], ["bench", "train", "--help"],
    ["models", "--help"], ["env", "--help"],
], ids=" ".join)
def test_help_imports_no_engine(args):
    code, loaded = loaded_by(*args)
    assert code == 0
    assert loaded == []


def test_a_usage_error_imports_no_engine():
    code, loaded = loaded_by("generate", "--class", "1", "--steps", "nan")
    assert code == 2
    assert loaded == []


def test_a_cpu_run_imports_no_triton(tmp_path, conformance_models):
    code, loaded = loaded_by("generate", "--model", str(conformance_models["hmar"]), "--class", "1", "--device", "cpu",
                             "--seed", "0", "--out", str(tmp_path / "x.png"))
    assert code == 0 and (tmp_path / "x.png").is_file()
    assert "torch" in loaded  # the check sees what a command imports
    assert "triton" not in loaded and "cv2" not in loaded and "hmar.train" not in loaded and "hmar.benchmark" not in loaded


def test_the_kernels_package_and_its_scale_table_import_nothing_costly():
    script = ("import json, sys; import hmar.kernels; from hmar.kernels.scales import PATCH_NUMS; "
              f"print(json.dumps([name for name in {COSTLY!r} if name in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_hmar_does_not_import_torch_until_asked():
    script = ("import sys, hmar; assert 'torch' not in sys.modules; "
              "from hmar import Pipeline, ModelConfig, HmarError; assert 'torch' in sys.modules; print(Pipeline.__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Pipeline"


# A command imports the engine in its body; a signal there unwinds it like any other.
SIGNAL_WHILE_A_COMMAND_IMPORTS = textwrap.dedent("""
    import builtins, os, signal, sys, time

    real_import = builtins.__import__

    def import_and_signal(name, *args, **kwargs):
        if name == "hmar.pipeline":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(120)
        return real_import(name, *args, **kwargs)

    builtins.__import__ = import_and_signal
    sys.argv = ["hmar", *sys.argv[1:]]
    from hmar_cli.app import main
    main()
""")


def test_ctrl_c_while_a_command_imports_the_engine_is_one_line(tmp_path, conformance_models):
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_A_COMMAND_IMPORTS, "generate", "--model", str(conformance_models["hmar"]),
                             "--class", "1", "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 130
    assert result.stderr.strip() == "error: stopped by SIGINT" and "Traceback" not in result.stderr
    assert not out.exists()
