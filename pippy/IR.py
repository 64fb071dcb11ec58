"""PiPPy's older public module path of its pipe IR (``from pippy.IR import Pipe, pipe_split, ...``), same names as ``pippy._IR``.

    >>> import pippy
    >>> from pippy.IR import Pipe, annotate_split_points, pipe_split
    >>> Pipe is pippy.Pipe and pipe_split is pippy.pipe_split
    True
"""

from pippy._IR import *  # noqa: F403
from pippy._IR import __all__  # noqa: F401
