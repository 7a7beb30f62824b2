"""Install retinanet; build the CUDA extension when torch has CUDA and nvcc is present."""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version(path="retinanet/__init__.py"):
    """__version__ from the package's __init__.py, read as text: importing the package needs torch."""
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no __version__ = '...' line in {path}")
    return match.group(1)


# The GPU architectures of the torch extension and of the plugin library: one list, kept
# in a data file that scripts/check_plugins.sh and csrc/CMakeLists.txt read as well.
ARCH_LIST_FILE = "csrc/cuda_arch_list.txt"
_ARCH_ENTRY = re.compile(r"\d+\.\d+a?(\+PTX)?")


def cuda_arch_list():
    """The TORCH_CUDA_ARCH_LIST for every CUDA build: the environment's when set, else ARCH_LIST_FILE's.

    Numeric entries only (X.Y, X.Ya, with +PTX), since check_plugins.sh and CMake turn the
    list into nvcc flags without torch; entries are joined with ';'.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    source = "TORCH_CUDA_ARCH_LIST"
    if not value:
        source = ARCH_LIST_FILE
        with open(os.path.join(HERE, ARCH_LIST_FILE), encoding="utf-8") as f:
            value = " ".join(line.split("#", 1)[0] for line in f)
    entries = value.replace(";", " ").split()
    bad = [e for e in entries if not _ARCH_ENTRY.fullmatch(e)]
    if bad or not entries:
        found = " ".join(bad) or "an empty list"
        raise SystemExit(f"retinanet: {source}: expected entries like 8.6, 9.0a or 12.0+PTX, not {found}")
    return ";".join(entries)


def cxx_runtime():
    """The path of the shared libstdc++ this process runs with (torch imported), else None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:  # not Linux
        return None
    return min(paths) if paths else None


def cuda_extension():
    """The torch extension for csrc/ (retinanet._C), or None with a one-line notice.

    Built when torch has CUDA and nvcc is found under CUDA_HOME, for cuda_arch_list()
    (also exported as TORCH_CUDA_ARCH_LIST, where torch's build and check_plugins.sh read
    it). RETINANET_NO_CUDA_EXT=1 skips the build.
    """
    if os.environ.get("RETINANET_NO_CUDA_EXT"):
        return None
    sources = sorted(glob.glob("csrc/kernels/*.cu") + glob.glob("csrc/torch/*.cpp"))
    if not sources:
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        print("retinanet: torch not importable at build time; installing pure Python", file=sys.stderr)
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if torch.version.cuda is None or nvcc is None or not shutil.which(nvcc):
        print(
            "retinanet: no CUDA toolkit (set CUDA_HOME) or torch without CUDA; "
            "installing pure Python, decode/NMS use the PyTorch reference",
            file=sys.stderr,
        )
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    runtime = cxx_runtime()
    return CUDAExtension(
        "retinanet._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-Wall"],
            "nvcc": ["-O3", "-lineinfo"],
        },
        # Link the C++ runtime torch runs with as a shared library, even with a g++ that links
        # its own statically (-static-libstdc++ by default, -lstdc++ included): with a second,
        # static copy in _C, building an op's error message (an ostream with its own locale)
        # crashed the process instead of raising. The library named by its path comes before
        # the driver's own, so the linker takes the C++ symbols from it.
        extra_link_args=[runtime] if runtime else [],
    )


def tensorrt_include():
    """TensorRT headers: $TENSORRT_INCLUDE, else the usual system folders; None if absent."""
    for folder in (os.environ.get("TENSORRT_INCLUDE"), "/usr/include/x86_64-linux-gnu", "/usr/local/tensorrt/include"):
        if folder and os.path.isfile(os.path.join(folder, "NvInfer.h")):
            return folder
    return None


def main():
    ext = cuda_extension()
    cmdclass = {}
    if ext is not None:
        from torch.utils.cpp_extension import BuildExtension

        base = BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))

        class BuildWithPlugins(base):
            """The torch extension, plus the TensorRT plugin library when TensorRT headers are found."""

            def run(self):
                super().run()
                include = tensorrt_include()
                if include is None:
                    print(
                        "retinanet: no TensorRT headers (set TENSORRT_INCLUDE); TensorRT plugins not built",
                        file=sys.stderr,
                    )
                    return
                import subprocess

                out = os.path.abspath(os.path.join(self.build_temp, "plugins"))
                # The torch extension's architectures: cuda_extension() put them in the environment.
                env = {**os.environ, "TENSORRT_INCLUDE": include, "PLUGINS_ONLY": "1"}
                subprocess.run(["bash", os.path.join(HERE, "scripts", "check_plugins.sh"), out], check=True, env=env)
                target = "retinanet" if self.inplace else os.path.join(self.build_lib, "retinanet")
                shutil.copy(os.path.join(out, "libretinanet_plugins.so"), target)

        cmdclass["build_ext"] = BuildWithPlugins

    VIDEO = ["av>=18.1,<19; python_version < '3.12'", "av>=18.1; python_version >= '3.12'"]
    setup(
        name="retinanet",
        version=read_version(),
        description="Fast single-stage object detection (RetinaNet) for NVIDIA GPUs: train, infer, export",
        packages=find_packages(include=["retinanet", "retinanet.*"]),
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "pillow", "pycocotools>=2.0.7"],
        extras_require={
            # ONNX export (the torch.onnx dynamo exporter needs onnxscript) and ONNX Runtime inference.
            "onnx": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
            # --with-dali: DALI 2.x for CUDA 13 (its CPU pipelines also run without a GPU).
            "dali": ["nvidia-dali-cuda130>=2.0"],
            # --video and --draw OUT.mp4: PyAV's wheels bundle FFmpeg with libx264 (GPL).
            # av 19 needs Python 3.12; 18.1 is the last for 3.11.
            "video": VIDEO,
            "test": [
                "pytest>=7",
                # The oracle of the rotated-box IoU (tests/test_rotated_ops.py).
                "shapely>=2.0",
                "tensorboard",
                "onnx>=1.17",
                "onnxscript>=0.5",
                "onnxruntime>=1.20",
                "nvidia-dali-cuda130>=2.0",
                *VIDEO,
                # The style checks (tests/test_style.py): pinned, since formatters change between versions.
                "ruff==0.17.6",
                "mypy==2.4.1",
                "clang-format==23.1.5",
            ],
            "tensorboard": ["tensorboard"],
        },
        entry_points={"console_scripts": ["retinanet=retinanet.cli:main"]},
        ext_modules=[ext] if ext is not None else [],
        cmdclass=cmdclass,
    )


# setuptools runs this file as __main__; tests import its functions without building anything.
if __name__ == "__main__":
    main()
