"""Plain Python objects from every rank, for counters and per-sample results that tensors cannot
carry (strings, variable lengths). One process, or no process group: just this rank's."""

from __future__ import annotations

import torch


def all_gather_objects(obj: object) -> list:
    """`obj` from every rank, in rank order; every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts
