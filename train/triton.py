"""`python -m train.export ... format=onnx triton=NAME`: the bundle also as a Triton Inference
Server model repository, served by Triton's ONNX Runtime backend (and KServe's Triton runtime,
scripts/deploy/kserve-triton.yaml).

    OUT/triton/NAME/config.pbtxt       the graph's input and output, names, types and dims read
                                       from model.onnx itself; batch dimension dynamic, batched
                                       server-side (dynamic_batching)
    OUT/triton/NAME/1/model.onnx       the bundle's model, version 1
    OUT/triton/NAME/labels.txt         class names, one a line, for a classifier's output
    OUT/triton/NAME/preprocess.json    the bundle's: how a client prepares pixels, the threshold

Triton runs the graph only: a client resizes and crops as preprocess.json says, sends uint8 RGB
(N, 3, S, S), and applies the threshold to the probabilities itself.
"""

from __future__ import annotations

import os
import shutil

from train.bundle import FILES, PREPROCESS

MAX_BATCH = 64  # Triton's max_batch_size: the largest batch its dynamic batcher forms
# ONNX element types → Triton's data types (those our graphs use)
TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 10: "TYPE_FP16", 7: "TYPE_INT64", 3: "TYPE_INT8"}


def write_repository(bundle_dir: str, out_dir: str, name: str, classes: list[str]) -> str:
    """The Triton model repository for the bundle's ONNX model, at out_dir/name; returns its path."""
    import onnx

    model_path = os.path.join(bundle_dir, FILES["onnx"])
    graph = onnx.load(model_path, load_external_data=False).graph
    (graph_input,), (graph_output,) = graph.input, graph.output
    repo = os.path.join(out_dir, name)
    os.makedirs(os.path.join(repo, "1"), exist_ok=True)
    shutil.copyfile(model_path, os.path.join(repo, "1", FILES["onnx"]))
    shutil.copyfile(os.path.join(bundle_dir, PREPROCESS), os.path.join(repo, PREPROCESS))
    out_dims = _dims(graph_output)
    labels = len(out_dims) == 1 and out_dims[0] == len(classes)  # a class per output: Triton names them
    if labels:
        with open(os.path.join(repo, "labels.txt"), "w") as f:
            f.write("".join(f"{c}\n" for c in classes))
    with open(os.path.join(repo, "config.pbtxt"), "w") as f:
        f.write(config(name, graph_input, graph_output, labels))
    return repo


def config(name: str, graph_input, graph_output, labels: bool) -> str:
    """config.pbtxt (protobuf text format) for one ONNX input and output."""

    def tensor(t, extra: str = "") -> str:
        dims = ", ".join(str(d) for d in _dims(t))
        kind = TYPES[t.type.tensor_type.elem_type]
        return f'  {{\n    name: "{t.name}"\n    data_type: {kind}\n    dims: [ {dims} ]{extra}\n  }}'

    label = '\n    label_filename: "labels.txt"' if labels else ""
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {MAX_BATCH}\n"
        f"input [\n{tensor(graph_input)}\n]\n"
        f"output [\n{tensor(graph_output, label)}\n]\n"
        "dynamic_batching { }\n"
    )


def _dims(t) -> list[int]:
    """A tensor's dims after the batch (Triton adds the batch dimension itself)."""
    dims = t.type.tensor_type.shape.dim
    return [d.dim_value if d.dim_value else -1 for d in dims[1:]]
