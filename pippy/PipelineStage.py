"""Compatibility face: ``from pippy.PipelineStage import PipelineStage``.

    >>> from pippy.PipelineStage import PipelineStage
    >>> import pippy.runtime.userstage
    >>> PipelineStage is pippy.runtime.userstage.PipelineStage
    True
"""

from pippy.runtime.userstage import PipelineStage

__all__ = ["PipelineStage"]
