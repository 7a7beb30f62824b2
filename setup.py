"""Install retinanet; build the CUDA extension when torch has CUDA and nvcc is present."""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def cuda_extension():
    """The torch extension for csrc/, or None with a one-line notice."""
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
    if torch.version.cuda is None or CUDA_HOME is None or not shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")):
        print("retinanet: no CUDA toolkit (set CUDA_HOME) or torch without CUDA; "
              "installing pure Python, decode/NMS use the PyTorch reference", file=sys.stderr)
        return None
    return CUDAExtension(
        "retinanet._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )


ext = cuda_extension()
cmdclass = {}
if ext is not None:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))

setup(
    name="retinanet",
    version="0.1.0",
    description="Fast single-stage object detection (RetinaNet) for NVIDIA GPUs: train, infer, export",
    packages=find_packages(include=["retinanet", "retinanet.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "pillow", "pycocotools>=2.0.7"],
    extras_require={
        "test": ["pytest>=7"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["retinanet=retinanet.cli:main"]},
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
)
