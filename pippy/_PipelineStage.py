"""PiPPy's private module path of its stage classes, kept for scripts that import from it.

    >>> from pippy._PipelineStage import PipelineStage, PipelineStageBase
    >>> issubclass(PipelineStage, PipelineStageBase)
    True
"""

from pippy.runtime.stage import Stage
from pippy.runtime.userstage import PipelineStage

PipelineStageBase = Stage  # what every stage is: forward, backward, per micro-batch
_PipelineStage = PipelineStage  # PiPPy's traced-stage class

__all__ = ["PipelineStage", "PipelineStageBase", "_PipelineStage"]
