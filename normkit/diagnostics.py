"""Small-batch diagnostics: when batch statistics are too noisy to trust.

(The statistics and the warning logic are filled in by the diagnostics work; this
module already defines the warning category so that filters can name it.)
"""
from __future__ import annotations

__all__ = ["UnstableBatchStatisticsWarning"]


class UnstableBatchStatisticsWarning(UserWarning):
    """Batch statistics computed in training mode are too noisy to trust."""
