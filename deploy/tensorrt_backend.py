"""TensorRT engines and the TensorRT backend. The only module that imports ``tensorrt``.

Imports cleanly without TensorRT; :func:`unavailable_reason` says why it cannot run.
"""

from __future__ import annotations

INSTALL_HINT = (
    "install TensorRT (pip install 'compress-deploy[gpu]' on a CUDA host) or run inside the "
    "project's Docker image (see Dockerfile), which ships it"
)


def unavailable_reason() -> str:
    """Empty when TensorRT and a CUDA device are usable here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed; {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is visible"
    return ""
