"""Training: `python -m train`, and `load_model` for notebooks."""


def __getattr__(name: str):
    # Lazy, so `python -m train --help` and config errors answer before torch and Lightning load.
    if name == "load_model":
        from train.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'train' has no attribute {name!r}")


__all__ = ["load_model"]
