"""PiPPy's private module path of its stage classes, kept for scripts that import from it.

    >>> from pippy._PipelineStage import PipelineStage, PipelineStageBase
    >>> issubclass(PipelineStage, PipelineStageBase)
    True
"""

from pippy.runtime.api import PipelineStage
from pippy.runtime.stage import Stage

PipelineStageBase = Stage  # what every stage is: forward, backward, per micro-batch
_PipelineStage = PipelineStage  # PiPPy's traced-stage class

__all__ = ["PipelineStage", "PipelineStageBase", "_PipelineStage"]
