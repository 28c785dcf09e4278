"""What the command-line entry points share (`python -m train`, `train.evaluate`, `train.export`):
where Hydra finds conf/, one console stream, and one way to report a user's mistake."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from omegaconf import DictConfig

from data.errors import Preempted, UserError, message
from train.console import one_log_stream

log = logging.getLogger("train")
# conf/ beside this package in a source tree (a checkout, or `ray job submit --working-dir .`,
# which ships the tree and imports `train` from it); inside an installed wheel it is train.conf.
_SOURCE_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
CONFIG_PATH = "../conf" if os.path.isfile(os.path.join(_SOURCE_CONF, "train.yaml")) else "pkg://train.conf"


def run_cli(command: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """Run `command(cfg)`; a UserError prints as one line (no traceback) and exits 2, a
    preemption as one line and exits 128 + the signal's number."""
    one_log_stream()
    try:
        return command(cfg)
    except UserError as e:
        log.error("error: %s", message(e))
        sys.exit(2)
    except Preempted as e:
        log.error("%s", e)
        sys.exit(e.code)


def compose(config_name: str, *overrides: str) -> DictConfig:
    """A primary config of conf/ (train, evaluate, export) with overrides, as the command line
    composes it: for notebooks and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    if CONFIG_PATH == "../conf":
        context = initialize_config_dir(os.path.abspath(_SOURCE_CONF), version_base="1.3")
    else:
        context = initialize_config_module("train.conf", version_base="1.3")
    with context:
        return hydra_compose(config_name, overrides=list(overrides))
