"""``compress-deploy triton-repo RUN OUT``: a Triton model repository for the stock Triton container.

    compress-deploy triton-repo RUN OUT [--unet auto|tensorrt|onnxruntime|python] [--backend B]
                                        [same batching options as serve]

The UNet is a TensorRT plan where the run has an engine (``auto``), else ONNX, or a
Python-backend model running ``--backend`` in process; the sampler is a Python-backend
model calling it (BLS). A conditional run's repository has a ``text_to_image`` model instead
(``prompt`` in, ``image`` out) calling ``unet`` and the run's ``text_encoder`` and
``vae_decoder`` graphs, each served like the UNet (plan, ONNX or Python backend).
"""

from __future__ import annotations

from pathlib import Path

from compressor.config import ServeConfig
from compressor.errors import UserError
from deploy.triton import UNET_KINDS, write_repository
from pipeline.commands.args import CommandParser, config_flag, run_arg, run_dir_arg
from pipeline.commands.serve import batching_args, repo_settings


def main(argv: list[str]) -> int:
    """Write the repository and say what each model serves."""
    parser = CommandParser(prog="compress-deploy triton-repo", description=__doc__.split("\n")[0])
    run_arg(parser)
    parser.add_argument("out", metavar="OUT", type=Path, help="the model repository folder to write")
    parser.add_argument(
        "--unet", default="auto", help=f"how the unet is served: one of {', '.join(UNET_KINDS)}"
    )
    config_flag(parser, "--backend", ServeConfig, "backend", help="in-process backend of --unet python")
    batching_args(parser)
    args = parser.parse_intermixed_args(argv)
    if args.unet not in UNET_KINDS:
        raise UserError(f"--unet: expected one of {', '.join(UNET_KINDS)}, got {args.unet!r}")
    run = run_dir_arg(args.run)
    facts = write_repository(run, args.out, repo_settings(args, args.backend, args.unet, run))
    if facts["entry"] == "sampler":
        print(f"wrote {args.out}: unet = {facts['unet']}; sampler = Python backend (BLS calls to unet)")
    else:
        graphs = "".join(f"; {name} = {where}" for name, where in facts["graphs"].items())
        print(
            f"wrote {args.out}: unet = {facts['unet']}{graphs}; {facts['entry']} = Python backend with the "
            f"run's tokenizer (prompt in, image out; BLS calls to {', '.join(['unet', *facts['graphs']])})"
        )
    print(f"configs parsed with Triton's ModelConfig protobuf; image shape {facts['image_shape']}")
    return 0
