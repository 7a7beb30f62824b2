# retinanet with its CUDA extension and TensorRT plugins, on an NGC PyTorch image
# (which ships CUDA, PyTorch and TensorRT). Build: docker build -t retinanet .
# Run:   docker run --gpus all -it -v $PWD:/work retinanet retinanet infer /work/model.plan --images /work/images
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /opt/retinanet
COPY . .
# TensorRT headers live in /usr/include/x86_64-linux-gnu on NGC images; setup.py
# finds them there and builds libretinanet_plugins.so into the package.
# TORCH_CUDA_ARCH_LIST: the GPUs to build the extension and the plugins for, e.g.
# --build-arg TORCH_CUDA_ARCH_LIST=9.0 (faster); empty: csrc/cuda_arch_list.txt.
ARG TORCH_CUDA_ARCH_LIST=
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN pip install --no-cache-dir --no-build-isolation '.[onnx,dali]' \
 && python -c "import retinanet._C, os, retinanet; \
print('plugins:', os.path.exists(os.path.join(os.path.dirname(retinanet.__file__), 'libretinanet_plugins.so')))"

WORKDIR /work
CMD ["retinanet", "--help"]
