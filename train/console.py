"""One console stream for a run, in every process that trains (the CLI's, and Ray's workers)."""

import logging
import warnings


def one_log_stream() -> None:
    """`import lightning` adds a console handler of its own although its records also reach
    Hydra's (console and run-dir file), which would print every line twice; drop it, and the
    advert Lightning logs on every start."""
    import lightning.pytorch  # noqa: F401  (its handler is added on import: import first, then drop it)

    logging.getLogger("lightning").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡")
    )
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
