"""The style checks: ruff (lint and format), mypy on the typed core, clang-format on the C++/CUDA.

The tools are pinned in the [test] extra, so CI has them: a missing one fails here.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CXX_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")
CXX_FOLDERS = ("csrc", "extras", "tests/plugins", "tests/deepstream", "tests/cppapi")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def tracked(*folders: str) -> list[str]:
    out = run("git", "ls-files", "--", *folders).stdout.split()
    return [f for f in out if f.endswith(CXX_SUFFIXES)]


def test_ruff_finds_nothing():
    proc = run(sys.executable, "-m", "ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    proc = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing_in_the_typed_core():
    proc = run(sys.executable, "-m", "mypy")  # files and settings: pyproject.toml [tool.mypy]
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_clang_format_leaves_every_cxx_file_as_it_is():
    files = tracked(*CXX_FOLDERS)
    assert len(files) >= 15, files  # the kernels, the torch op, the plugins, the programs, the harness
    beside = Path(sys.executable).parent / "clang-format"  # the venv's, even when it is not on PATH
    tool = str(beside) if beside.exists() else "clang-format"
    proc = run(tool, "--dry-run", "-Werror", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
