# GPU host image: NVIDIA's PyTorch container ships CUDA, cuDNN, PyTorch and TensorRT.
# Build:  docker build -t compress-deploy .
# Run:    docker run --gpus all --rm -v "$PWD/runs:/work/runs" -v /data:/data \
#             compress-deploy configs/celebahq.yaml
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /work
COPY pyproject.toml README.md ./
COPY compressor ./compressor
COPY export ./export
COPY deploy ./deploy
COPY pipeline ./pipeline
COPY configs ./configs

# The container's torch and TensorRT stay; the CPU onnxruntime is swapped for the CUDA
# build (both ship the module `onnxruntime`, so only one may be installed).
RUN pip install --no-cache-dir -e ".[fid]" \
 && pip uninstall -y onnxruntime \
 && pip install --no-cache-dir "onnxruntime-gpu>=1.20" \
 && python -c "import tensorrt, onnxruntime; print('TensorRT', tensorrt.__version__, onnxruntime.get_available_providers())"

ENTRYPOINT ["compress-deploy"]
CMD ["configs/celebahq.yaml"]
