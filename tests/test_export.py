"""ONNX export, the parity helper (Polygraphy comparator) and the ONNX Runtime backend."""

from __future__ import annotations

import onnx
import pytest
import torch

from compressor.config import PruneConfig
from compressor.errors import ArtifactError
from compressor.models import example_inputs, predict_noise
from compressor.pruning import prune_unet
from compressor.sampling import make_scheduler
from deploy.runtimes import onnxruntime_backend
from export.compare import compare, make_onnxrt_runner, make_torch_runner, parity_feeds
from export.onnx_export import check_onnx, export_unet, onnx_sample_shape
from tests.conftest import DDPM_SCHEDULER


@pytest.fixture
def pruned_unet(tiny_unet):
    prune_unet(
        tiny_unet,
        make_scheduler("ddpm", DDPM_SCHEDULER),
        None,
        PruneConfig(method="magnitude", ratio=0.25),
        0,
    )
    return tiny_unet


@pytest.mark.parametrize("which", ["tiny_unet", "pruned_unet", "tiny_cond_unet"])
def test_fp32_export_matches_torch_at_several_batches_and_timesteps(which, request, tmp_path):
    unet = request.getfixturevalue(which)
    path = tmp_path / "unet.fp32.onnx"
    info = export_unet(unet, path, "fp32")
    assert info["opset"] >= 18 and not info["external_data"]
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["sample", "timestep"]
    assert [o.name for o in proto.graph.output] == ["noise"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    feeds = parity_feeds(unet, [1, 3], [0, 500, 999])
    report = compare([make_torch_runner(unet, "torch"), make_onnxrt_runner(path, "ort")], feeds, 1e-4, 1e-4)[
        0
    ]
    assert report.passed
    assert report.max_abs_error < 1e-4 and report.min_cosine > 0.99999
    assert {c["batch"] for c in report.cases} == {1, 3}
    assert {c["timestep"] for c in report.cases} == {0, 500, 999}


def test_fp16_export_keeps_norms_in_fp32_and_is_close(tiny_unet, tmp_path):
    path = tmp_path / "unet.fp16.onnx"
    facts = export_unet(tiny_unet, path, "fp16")
    assert facts["traced_size"] == [8, 8]  # traced small (CPUs lack fast fp16 convs), then pinned
    proto = onnx.load(str(path))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        assert [d.dim_value for d in value.type.tensor_type.shape.dim[1:]] == [3, 16, 16]
    types = {i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types == {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}  # fp32 I/O
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(weights) > 10
    typed = onnx.shape_inference.infer_shapes(proto)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input]}
    elem |= {t.name: t.data_type for t in typed.graph.initializer}
    elem |= {o.name: o.type.tensor_type.elem_type for o in typed.graph.output}
    norms = ("InstanceNormalization", "GroupNormalization", "LayerNormalization")
    norm_ops = [n for n in typed.graph.node if n.op_type in norms]
    assert len(norm_ops) == sum(isinstance(m, torch.nn.GroupNorm) for m in tiny_unet.modules())
    fp32 = onnx.TensorProto.FLOAT
    for node in norm_ops:  # data, scale and bias in, normalised data out: all float32
        assert [elem[i] for i in node.input if i] == [fp32] * len([i for i in node.input if i]), node.name
        assert [elem[o] for o in node.output] == [fp32], node.name
    softmax = [n for n in typed.graph.node if n.op_type == "Softmax"]
    upcast = [m for m in tiny_unet.modules() if getattr(m, "upcast_softmax", False)]
    assert len(softmax) == len(upcast) == 4  # UNet2D attentions ask for an fp32 softmax
    assert all(elem[n.input[0]] == fp32 and elem[n.output[0]] == fp32 for n in softmax)
    matmuls = [n for n in typed.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")]
    assert sum(elem[n.output[0]] == onnx.TensorProto.FLOAT16 for n in matmuls) >= 0.9 * len(matmuls)
    backend = onnxruntime_backend(path)
    x = example_inputs(tiny_unet, 2)
    with torch.no_grad():
        ref = predict_noise(tiny_unet, x["sample"], x["timestep"])
    got = backend.predict(x["sample"], x["timestep"])
    assert (got - ref).abs().max() < 2e-2


@pytest.mark.parametrize("which", ["pruned_unet", "tiny_cond_unet"])
def test_fp16_graph_traced_small_runs_at_full_size(which, request, tmp_path):
    unet = request.getfixturevalue(which)
    path = tmp_path / "unet.fp16.onnx"
    assert export_unet(unet, path, "fp16")["traced_size"] == [8, 8]
    feeds = parity_feeds(unet, [1, 3], [0, 999])
    report = compare([make_torch_runner(unet, "torch"), make_onnxrt_runner(path, "ort")], feeds, 2e-2, 2e-2)[
        0
    ]
    assert report.passed and report.min_cosine > 0.999, report.max_abs_error


def test_parity_failure_is_reported_not_hidden(tiny_unet, tmp_path):
    path = tmp_path / "u.onnx"
    export_unet(tiny_unet, path, "fp16")
    feeds = parity_feeds(tiny_unet, [1], [500])
    report = compare(
        [make_torch_runner(tiny_unet, "torch"), make_onnxrt_runner(path, "ort")], feeds, 1e-9, 0.0
    )[0]
    assert not report.passed and report.max_abs_error > 1e-9


def test_onnxruntime_backend_reports_the_provider_that_ran(tiny_unet, tmp_path):
    path = tmp_path / "u.onnx"
    export_unet(tiny_unet, path, "fp32")
    backend = onnxruntime_backend(path)
    assert backend.info["provider"] == "CPUExecutionProvider"
    assert onnx_sample_shape(path) == (3, 16, 16)


def test_truncated_onnx_is_refused(tiny_unet, tmp_path):
    path = tmp_path / "u.onnx"
    export_unet(tiny_unet, path, "fp32")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ArtifactError, match="rerun the export"):
        check_onnx(path)


def test_onnx_with_other_input_names_is_refused(tmp_path):
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [inp], [out])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ArtifactError, match="do not match"):
        check_onnx(path)


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    w.data_location = TensorProto.EXTERNAL
    del w.float_data[:]
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    inp = helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("noise", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["sample", "w"], ["noise"])], "g", [inp], [out], [w])
    path = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ArtifactError, match="points outside its folder"):
        check_onnx(path)
