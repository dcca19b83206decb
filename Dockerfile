# GPU host image. Versions chosen so every GPU backend it ships really runs:
#   base  nvcr.io/nvidia/pytorch:25.10-py3  CUDA 13.0, cuDNN 9, PyTorch, TensorRT 10.13 (Python bindings)
#   onnxruntime-gpu >= 1.29 from PyPI       built for CUDA 13 (1.26 and older are CUDA 12 builds, whose
#                                           CUDA provider cannot load here and silently falls back to CPU)
# The build fails unless TensorRT imports and ONNX Runtime's CUDA provider finds all its libraries
# (scripts/image_selfcheck.py). The host needs an NVIDIA driver of the 580 series or newer (CUDA 13).
# Build:  docker build -t compress-deploy .
# Run:    docker run --gpus all --rm -v "$PWD/runs:/work/runs" -v /data:/data \
#             compress-deploy configs/celebahq.yaml
# Check:  docker run --gpus all --rm --entrypoint bash compress-deploy scripts/gpu_check.sh
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /work
COPY pyproject.toml README.md ./
COPY compressor ./compressor
COPY rundir ./rundir
COPY export ./export
COPY deploy ./deploy
COPY pipeline ./pipeline
COPY configs ./configs
COPY scripts ./scripts
COPY tests ./tests

# The container's torch and TensorRT stay; the CPU onnxruntime is swapped for the CUDA 13 build
# (both ship the module `onnxruntime`, so only one may be installed).
RUN pip install --no-cache-dir -e ".[fid,dev]" \
 && pip uninstall -y onnxruntime \
 && pip install --no-cache-dir "onnxruntime-gpu>=1.29,<1.32" \
 && python scripts/image_selfcheck.py

ENTRYPOINT ["compress-deploy"]
CMD ["configs/celebahq.yaml"]
