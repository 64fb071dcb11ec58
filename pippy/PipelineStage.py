"""Compatibility face: ``from pippy.PipelineStage import PipelineStage``.

    >>> from pippy.PipelineStage import PipelineStage
    >>> import pippy.runtime.api
    >>> PipelineStage is pippy.runtime.api.PipelineStage
    True
"""

from pippy.runtime.api import PipelineStage

__all__ = ["PipelineStage"]
