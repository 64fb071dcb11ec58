"""Compatibility face: ``from pippy.PipelineStage import PipelineStage``.

    >>> from pippy.PipelineStage import PipelineStage
"""

from pippy.runtime.stage import PipelineStage

__all__ = ["PipelineStage"]
