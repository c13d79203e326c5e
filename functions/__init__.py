"""omx.functions: the function registry, the handlers, and the authoring API of custom functions.

User code imports :func:`function`, :class:`Context` and :class:`FunctionSpec`
from here (see :mod:`omx.functions.sdk`); importing this package stays light.
"""

from omx.functions.sdk import Context, FunctionSpec, ModelCallError, function

__all__ = ["Context", "FunctionSpec", "ModelCallError", "function"]
