"""The builds of csrc/ agree: setup.py (torch extension), scripts/check_plugins.sh and csrc/CMakeLists.txt
(the TensorRT plugin library) make code for the same GPU architectures, and the two plugin builds compile
the same sources with the same flags. Nothing here rebuilds the installed package."""

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK_PLUGINS = ROOT / "scripts" / "check_plugins.sh"
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")  # functions only: no setup() call

ARCH_LISTS = [None, "9.0", "7.5;8.6+PTX", "8.0 9.0a+PTX", "10.0;12.0"]  # None: csrc/cuda_arch_list.txt


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [
        os.environ.get("NVCC"),
        shutil.which("nvcc"),
        cuda_home and os.path.join(cuda_home, "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def environment(arch_list, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDA_ARCH")}
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    env.update(extra)
    return env


def check_plugins(*args, env):
    proc = subprocess.run(["bash", str(CHECK_PLUGINS), *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def gencode_pairs(flags):
    """{(virtual arch, code)} from nvcc's -gencode=arch=A,code=C and CMake's --generate-code=arch=A,code=[C1,C2]."""
    pairs = set()
    for flag in flags:
        m = re.fullmatch(r"(?:-gencode|--generate-code)=arch=(\w+),code=\[?([\w,]+)\]?", flag)
        if m:
            pairs.update((m.group(1), code) for code in m.group(2).split(","))
    return pairs


def test_version_comes_from_the_package():
    import retinanet

    assert SETUP["read_version"]() == retinanet.__version__


def test_arch_list_file_is_the_default(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    text = (ROOT / SETUP["ARCH_LIST_FILE"]).read_text()
    entries = " ".join(line.split("#")[0] for line in text.splitlines()).replace(";", " ").split()
    assert SETUP["cuda_arch_list"]() == ";".join(entries)
    assert entries and entries[-1].endswith("+PTX"), "PTX of the newest architecture, for later GPUs"


@pytest.mark.parametrize("arch_list", ARCH_LISTS)
def test_plugin_arch_flags_are_the_torch_extensions(arch_list, monkeypatch):
    """check_plugins.sh's -gencode flags equal those torch's cpp_extension builds retinanet._C with,
    for the list setup.py gives it (the default file, or TORCH_CUDA_ARCH_LIST)."""
    from torch.utils import cpp_extension  # torch is a dependency: missing is a failure, not a skip

    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", SETUP["cuda_arch_list"]())  # what cuda_extension() exports
    torch_flags = sorted(cpp_extension._get_cuda_arch_flags())
    plugin_flags = sorted(check_plugins("--print-gencode", env=environment(arch_list)).split())
    assert plugin_flags == torch_flags


def test_unknown_arch_rejected_by_setup_and_check_plugins(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(SystemExit, match="Hopper"):
        SETUP["cuda_arch_list"]()
    proc = subprocess.run(
        ["bash", str(CHECK_PLUGINS), "--print-gencode"], capture_output=True, text=True, env=environment("Hopper")
    )
    assert proc.returncode == 2 and "Hopper" in proc.stderr


def test_cmake_reads_the_arch_list_file():
    cmake = (ROOT / "csrc" / "CMakeLists.txt").read_text()
    assert "cuda_arch_list.txt" in cmake and "TORCH_CUDA_ARCH_LIST" in cmake
    assert not re.search(r"CMAKE_CUDA_ARCHITECTURES\s+\d", cmake), "no architecture list of its own"


def compile_flags(command):
    """The flags that decide the object code, from one compile command: optimisation, language
    standard, defines, -f and warning options (host options unpacked from -Xcompiler), gencode pairs."""
    tokens = shlex.split(command)
    host, rest = [], []
    it = iter(tokens[1:])
    for tok in it:
        if tok == "-Xcompiler":
            host += next(it).split(",")
        elif tok.startswith("-Xcompiler="):
            host += tok.split("=", 1)[1].split(",")
        else:
            rest.append(tok)
    ignore = {"-Werror", "-forward-unknown-to-host-compiler"}  # -Werror: check_plugins.sh only
    keep = {t for t in rest + host if re.match(r"-(O|std=|D|f|W)", t) and t not in ignore}
    return keep, gencode_pairs(rest)


def source_of(command):
    tokens = shlex.split(command)
    return Path(tokens[tokens.index("-c") + 1]).resolve()


@pytest.mark.parametrize("arch_list", [None, "8.6;9.0+PTX"])
def test_cmake_build_matches_check_plugins(arch_list, tmp_path):
    """csrc/CMakeLists.txt (configured only: compile_commands.json) compiles the same sources as
    check_plugins.sh's plugin library, for the same architectures, with the same flags and defines."""
    cmake, nvcc = shutil.which("cmake"), find_nvcc()
    if cmake is None or nvcc is None:
        pytest.skip(f"needs cmake and nvcc (cmake: {cmake}, nvcc: {nvcc})")
    headers = tmp_path / "trt"  # configuring only checks that NvInfer.h exists
    headers.mkdir()
    (headers / "NvInfer.h").write_text("")
    env = environment(arch_list, TENSORRT_INCLUDE=str(headers), NVCC=nvcc)
    build = tmp_path / "cmake"
    proc = subprocess.run(
        [cmake, "-S", str(ROOT / "csrc"), "-B", str(build), "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"]
        + [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DTENSORRT_INCLUDE={headers}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from_cmake = {
        source_of(e["command"]): compile_flags(e["command"])
        for e in json.loads((build / "compile_commands.json").read_text())
    }

    lines = check_plugins("--dry-run", str(tmp_path / "out"), env=env).splitlines()
    library = next(i for i, line in enumerate(lines) if "libretinanet_plugins.so" in line)
    from_script = {source_of(line): compile_flags(line) for line in lines[:library]}

    assert sorted(from_cmake) == sorted(from_script)
    for source, (flags, pairs) in from_script.items():
        assert from_cmake[source] == (flags, pairs), source
    assert all(pairs for source, (_, pairs) in from_script.items() if source.suffix == ".cu")


@pytest.fixture
def tensorrt_headers():
    include = SETUP["tensorrt_include"]()
    if include is None:
        pytest.skip("no TensorRT headers: set TENSORRT_INCLUDE to a TensorRT include folder")
    return include


def test_check_plugins_compiles_everything(tensorrt_headers, tmp_path):
    """scripts/check_plugins.sh against real TensorRT headers: every source with -Werror, the plugin
    library, the harness. One architecture (9.0) to keep it near a minute on 2 cores; the flags of the
    full list are checked above."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (set CUDA_HOME or NVCC)")
    env = environment("9.0", TENSORRT_INCLUDE=tensorrt_headers, NVCC=nvcc)
    out = check_plugins(str(tmp_path), env=env)
    assert "all compiled without warnings" in out
    assert (tmp_path / "libretinanet_plugins.so").is_file() and (tmp_path / "plugin_harness").is_file()


def test_extension_uses_the_shared_cxx_runtime():
    """retinanet._C links libstdc++ as a shared library and holds no copy of it: with a static
    copy (a g++ that links its own statically), the ops crashed while building an error message
    instead of raising it."""
    from retinanet import ops

    if not ops.HAVE_EXTENSION:
        pytest.skip("retinanet._C is not built (no CUDA toolkit or a CPU-only torch)")
    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("binutils (readelf, nm) not found")
    import retinanet._C as ext

    dynamic = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic
    defined = subprocess.run(
        ["nm", "-D", "--defined-only", ext.__file__], capture_output=True, text=True, check=True
    ).stdout.split()
    copied = [name for name in defined if name.startswith(("_ZNSo", "_ZNSt6locale", "_ZNSt8ios_base"))]
    assert not copied, f"libstdc++ symbols defined inside retinanet._C: {copied[:5]}"
