"""`python -m train [+experiment=NAME] [overrides]`: Hydra composes conf/, `train.run.train` runs."""

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from data.errors import UserError, message

log = logging.getLogger("train")


def _one_log_stream() -> None:
    """`import lightning` adds a console handler of its own although its records also reach
    Hydra's (console and run-dir file), which would print every line twice; drop it, and the
    advert Lightning logs on every start."""
    logging.getLogger("lightning").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡")
    )
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


@hydra.main(version_base="1.3", config_path="pkg://train.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from train.run import train  # after argument parsing: `--help` and bad overrides stay fast

    _one_log_stream()

    try:
        result = train(cfg)
    except UserError as e:
        log.error("error: %s", message(e))
        sys.exit(2)
    return result["metrics"].get("val/acc")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
