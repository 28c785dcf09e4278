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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = run_cli(fit, cfg)
    return result["metrics"].get("val/acc")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
