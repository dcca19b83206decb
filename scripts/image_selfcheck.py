"""Build-time self-check of the GPU image: fail unless every GPU backend it ships can load.

    python scripts/image_selfcheck.py

Checks that TensorRT imports, that ONNX Runtime is the CUDA build (CUDAExecutionProvider
listed) and that its CUDA provider library finds every shared library it links against:
an onnxruntime-gpu built for another CUDA major than the image's lists the provider but
cannot load it, and then every session silently falls back to the CPU. Needs no GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def problems() -> list[str]:
    """Everything that would stop a GPU backend of this image from running."""
    out = []
    try:
        import tensorrt as trt

        print(f"TensorRT {trt.__version__}")
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        out.append(f"TensorRT does not import: {type(exc).__name__}: {exc}")
    import onnxruntime as ort

    providers = ort.get_available_providers()
    print(f"ONNX Runtime {ort.__version__}: {providers}")
    if "CUDAExecutionProvider" not in providers:
        out.append("ONNX Runtime lists no CUDAExecutionProvider (the CPU onnxruntime is installed?)")
    libs = sorted(Path(ort.__file__).parent.glob("capi/libonnxruntime_providers_cuda.so"))
    if not libs:
        out.append("libonnxruntime_providers_cuda.so not found in the onnxruntime package")
    for lib in libs:
        ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
        missing = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
        if missing:
            out.append(f"{lib.name} cannot load: missing {', '.join(missing)} (CUDA major mismatch?)")
    return out


if __name__ == "__main__":
    found = problems()
    for line in found:
        print(f"image self-check: {line}", file=sys.stderr)
    sys.exit(1 if found else 0)
