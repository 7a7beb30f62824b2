"""Install retinanet; build the CUDA extension when torch has CUDA and nvcc is present."""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup


def read_version(path="retinanet/__init__.py"):
    """__version__ from the package's __init__.py, read as text: importing the package needs torch."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), path), encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no __version__ = '...' line in {path}")
    return match.group(1)


def _default_arch_list(nvcc):
    """Every architecture the installed nvcc supports from 7.5 up, plus PTX of the newest."""
    import subprocess

    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    arches = sorted({int(m) for m in re.findall(r"compute_(\d+)", out) if int(m) >= 75})
    try:  # keep the ones this torch's cpp_extension knows
        from torch.utils.cpp_extension import _get_cuda_arch_flags
    except ImportError:
        _get_cuda_arch_flags = None
    names = []
    for a in arches:
        name = f"{a // 10}.{a % 10}"
        if _get_cuda_arch_flags is not None:
            saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
            os.environ["TORCH_CUDA_ARCH_LIST"] = name
            try:
                _get_cuda_arch_flags()
            except ValueError:
                continue
            finally:
                if saved is None:
                    del os.environ["TORCH_CUDA_ARCH_LIST"]
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = saved
        names.append(name)
    return ";".join(names) + "+PTX" if names else None


def cuda_extension():
    """The torch extension for csrc/ (retinanet._C), or None with a one-line notice.

    Built when torch has CUDA and nvcc is found under CUDA_HOME. TORCH_CUDA_ARCH_LIST
    picks the GPU architectures; by default every one the installed nvcc supports
    from 7.5 up, plus PTX of the newest. RETINANET_NO_CUDA_EXT=1 skips the build.
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
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        arches = _default_arch_list(nvcc)
        if arches:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arches
    return CUDAExtension(
        "retinanet._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-Wall"],
            "nvcc": ["-O3", "-lineinfo"],
        },
    )


def tensorrt_include():
    """TensorRT headers: $TENSORRT_INCLUDE, else the usual system folders; None if absent."""
    for folder in (os.environ.get("TENSORRT_INCLUDE"), "/usr/include/x86_64-linux-gnu", "/usr/local/tensorrt/include"):
        if folder and os.path.isfile(os.path.join(folder, "NvInfer.h")):
            return folder
    return None


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
                    "retinanet: no TensorRT headers (set TENSORRT_INCLUDE); TensorRT plugins not built", file=sys.stderr
                )
                return
            import subprocess

            out = os.path.abspath(os.path.join(self.build_temp, "plugins"))
            env = {**os.environ, "TENSORRT_INCLUDE": include, "PLUGINS_ONLY": "1"}
            subprocess.run(["bash", "scripts/check_plugins.sh", out], check=True, env=env)
            target = "retinanet" if self.inplace else os.path.join(self.build_lib, "retinanet")
            shutil.copy(os.path.join(out, "libretinanet_plugins.so"), target)

    cmdclass["build_ext"] = BuildWithPlugins

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
        "test": [
            "pytest>=7",
            "tensorboard",
            "onnx>=1.17",
            "onnxscript>=0.5",
            "onnxruntime>=1.20",
            "nvidia-dali-cuda130>=2.0",
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
