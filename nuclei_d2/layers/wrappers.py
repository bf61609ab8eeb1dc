"""Small helpers on ``nn.Module`` that every layer above may need."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself otherwise): its attributes, parameter
    names and methods other than ``forward`` are the inner module's."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
