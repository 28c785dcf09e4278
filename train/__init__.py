"""Training (`python -m train`), evaluation (`python -m train.evaluate`), export
(`python -m train.export`), and the same from a notebook:

    from train import load_model, evaluate_checkpoint, export_bundle

    report = evaluate_checkpoint("outputs/.../epoch009.ckpt", "eval/run1", "split=test")
    parity = export_bundle("eval/run1/model.ckpt", "onnx", "bundles/run1")
    load_model("bundles/run1").predict(["part.jpg"])
"""


def evaluate_checkpoint(ckpt: str, out: str, *overrides: str) -> dict:
    """`python -m train.evaluate ckpt=CKPT out=OUT OVERRIDES...`; returns metrics.json's content."""
    from train.cli import compose
    from train.evaluate import evaluate

    return evaluate(compose("evaluate", f"ckpt={ckpt}", f"out={out}", *overrides))


def export_bundle(ckpt: str, format: str, out: str, *overrides: str) -> dict:
    """`python -m train.export ckpt=CKPT format=FORMAT out=OUT OVERRIDES...`; returns parity.json."""
    from train.cli import compose
    from train.export import export

    return export(compose("export", f"ckpt={ckpt}", f"format={format}", f"out={out}", *overrides))


def __getattr__(name: str):
    # Lazy, so `python -m train --help` and config errors answer before torch and Lightning load.
    if name == "load_model":
        from train.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'train' has no attribute {name!r}")


__all__ = ["evaluate_checkpoint", "export_bundle", "load_model"]
