"""Compatibility face: ``from pippy.PipelineStage import PipelineStage``.

    >>> from pippy.PipelineStage import PipelineStage
"""

from pippy.runtime.api import PipelineStage

__all__ = ["PipelineStage"]
