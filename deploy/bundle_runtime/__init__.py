"""The runtime of a compress-deploy sampler bundle: numpy and ONNX Runtime (or TensorRT), nothing else.

``compress-deploy bundle RUN OUT`` copies this package into ``OUT/bundle_runtime/`` beside
the ONNX graph(s), the scheduler's tables (JSON + NPZ, no pickle), the acceptance limits,
reference inputs/outputs and a ``manifest.json`` with the sha256 of every file. On the
target::

    cd OUT
    python -m bundle_runtime info
    python -m bundle_runtime generate --seed 0 --num-images 16 --out images.png   # or .npy
    python -m bundle_runtime check                     # exit 0 pass, 3 fail, 4 inconclusive, 2 bad input

It never imports torch, diffusers or compress-deploy: the solver loops (DDIM with eta 0,
DPM-Solver++ 2M) are reimplemented here from the tables diffusers computed when the bundle
was made, and tested against diffusers' schedulers in the project's test suite. Image ``i``
of ``--seed S`` starts from numpy PCG64(S + i) standard normals, as in the project's own
sampler, so the same seed gives the same image as ``compress-deploy sample``. A bundle made
with ``--engine`` runs its TensorRT engines with TensorRT and cuda-python instead
(:mod:`.engines`; ``--backend onnxruntime`` or ``--fallback`` for the ONNX graphs).

A conditional run's bundle (text-to-image, class-conditioned) runs the whole call
(:mod:`.guided_sampler`): ``generate --prompt TEXT [--negative-prompt TEXT] [--guidance-scale G]
[--steps N]`` tokenizes with the bundled ``tokenizer.json`` (``tokenizers``, a text-to-image bundle's
third requirement), encodes with the text encoder graph, guides the UNet loop and decodes the latents
with the VAE decoder graph; ``check`` also decides the tokenizer, each graph and the whole call.
"""

FORMAT = "compress-deploy-bundle/1"
