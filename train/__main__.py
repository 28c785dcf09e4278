"""`python -m train [+experiment=NAME] [overrides]`: Hydra composes conf/, `train.run.train` runs."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from data.errors import UserError, message
from train.console import one_log_stream

log = logging.getLogger("train")
# conf/ beside this package in a source tree (a checkout, or `ray job submit --working-dir .`,
# which ships the tree and imports `train` from it); inside an installed wheel it is train.conf.
_SOURCE_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
CONFIG_PATH = "../conf" if os.path.isfile(os.path.join(_SOURCE_CONF, "train.yaml")) else "pkg://train.conf"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from train.run import train  # after argument parsing: `--help` and bad overrides stay fast

    one_log_stream()

    try:
        if cfg.launcher.kind == "ray":
            from train.ray_launch import launch

            result = launch(cfg)
        else:
            result = train(cfg)
    except UserError as e:
        log.error("error: %s", message(e))
        sys.exit(2)
    return result["metrics"].get("val/acc")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
