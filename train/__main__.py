"""`python -m train [+experiment=NAME] [overrides]`: Hydra composes conf/, `train.run.train` runs."""

import hydra
from omegaconf import DictConfig

from train.cli import CONFIG_PATH, run_cli


def fit(cfg: DictConfig) -> dict:
    # Imported after argument parsing: `--help` and bad overrides stay fast.
    if cfg.launcher.kind == "ray":
        from train.ray_launch import launch

        return launch(cfg)
    from train.run import train

    return train(cfg)


def write_summary(result: dict, run_dir: str) -> None:
    """RUN/summary.json: the final validation metrics and where the best and last checkpoints
    are, for a pipeline's next step (scripts/deploy/kubeflow_pipeline.py) or an auditor."""
    import json
    import os

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0 or not os.path.isdir(run_dir):
        return
    keep = ("metrics", "epochs", "global_step", "best_checkpoint", "best_score", "last_checkpoint")
    tmp = os.path.join(run_dir, ".summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump({k: result.get(k) for k in keep}, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "summary.json"))  # whole or absent


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = run_cli(fit, cfg)
    write_summary(result, cfg.paths.output_dir)
    return result["metrics"].get("val/acc")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
