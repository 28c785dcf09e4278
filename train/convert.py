"""Writing a `Probabilities` module in each bundle format, with the checks each format offers
where it is written: onnx.checker for ONNX, the saved spec for Core ML. Each converter is
imported only for its own format."""

from __future__ import annotations

import copy
import json
import logging

import torch
from torch import nn

from data.errors import UserError
from train.bundle import quiet_torchscript

log = logging.getLogger("train")

# The packages each format needs; the first is the converter, named in a failure's message.
NEEDS = {"onnx": ("onnxscript", "onnx", "onnxruntime"), "coreml": ("coremltools",), "torchscript": ()}


def convert(model: nn.Module, fmt: str, path: str, example: torch.Tensor, int8_weights: bool = False) -> dict:
    """Write `model` to `path` in `fmt`; returns what the format's own checks said. `int8_weights`:
    Core ML's weights linearly quantized to int8 (ONNX's int8 is train/quantize.py's)."""
    if fmt == "onnx":
        import onnx

        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=True,
            input_names=["images"],
            output_names=["probs"],
            dynamic_shapes={"images": {0: batch}},
            external_data=False,  # one file: the bundle's model is model.onnx alone
            verbose=False,
        )
        proto = onnx.load(path)
        onnx.checker.check_model(proto, full_check=True)
        return {"onnx_checker": "passed (full_check)", "opset": proto.opset_import[0].version}
    if fmt == "torchscript":
        log.info(
            "TorchScript is deprecated since torch 2.10 (it still loads in libtorch); ONNX is the format "
            "with a future"
        )
        with torch.no_grad(), quiet_torchscript():
            traced = torch.jit.freeze(torch.jit.trace(model, example))
        traced.save(path)
        return {"traced_with_batch": len(example)}
    return _coreml(model, path, example, int8_weights)


def _coreml(model: nn.Module, path: str, example: torch.Tensor, int8_weights: bool = False) -> dict:
    import coremltools as ct

    half = model.net.mean.dtype == torch.float16
    model = copy.deepcopy(model).float()  # Core ML converts float32 graphs; fp16 is its own option
    size = example.shape[-1]
    with torch.no_grad(), quiet_torchscript():
        traced = torch.jit.trace(model, example[:1].float())
    ml = ct.convert(
        traced,
        inputs=[ct.ImageType(name="images", shape=(1, 3, size, size), color_layout=ct.colorlayout.RGB)],
        outputs=[ct.TensorType(name="probs")],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if half else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS16,
    )
    if int8_weights:  # weights stored as int8 with a scale per output channel; arithmetic as before
        from coremltools.optimize import coreml as cto

        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
        ml = cto.linear_quantize_weights(ml, config=config)
    ml.user_defined_metadata["classes"] = json.dumps(list(model.net.spec.classes))
    ml.save(path)
    # Validation that runs anywhere: the saved package loads as an ML program with our interface.
    spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
    problems = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"type {spec.WhichOneof('Type')}, expected mlProgram")
    (inp,), (out,) = spec.description.input, spec.description.output
    image = inp.type.imageType
    if inp.name != "images" or (image.width, image.height) != (size, size):
        problems.append(f"input {inp.name} {image.width}x{image.height}, expected images {size}x{size}")
    if out.name != "probs":
        problems.append(f"output {out.name}, expected probs")
    if problems:
        raise UserError(f"Core ML conversion produced an unexpected model: {'; '.join(problems)}")
    return {"coreml_spec": f"valid mlprogram, specification version {spec.specificationVersion}"}


def converter_version(fmt: str) -> str:
    from importlib import metadata

    return "".join(f" and {name} {metadata.version(name)}" for name in NEEDS[fmt][:1])


def check_installed(fmt: str) -> None:
    import importlib.util

    missing = [m for m in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"format={fmt} needs {', '.join(NEEDS[fmt])} (missing: {', '.join(missing)}): "
            f"pip install {' '.join(missing)}, or pip install -e '.[export]'"
        )
