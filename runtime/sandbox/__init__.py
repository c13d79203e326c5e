"""Custom functions' sandbox: bubblewrap workers, their warm pools, and deploy-time inspection.

Custom code never runs in the node's process. :func:`inspect_source` imports a
file in a throw-away sandboxed worker to list its functions; a
:class:`FunctionPool` keeps warm workers for one function version and runs
calls on them; :func:`sandbox_problem` says why this machine cannot (then
nothing custom runs at all).
"""

from omx.runtime.sandbox._bwrap import probe_sandbox, sandbox_problem
from omx.runtime.sandbox.errors import DeployError, FunctionError, SandboxUnavailable
from omx.runtime.sandbox.inspection import inspect_source
from omx.runtime.sandbox.pool import CallResult, ContextHost, FunctionPool, filter_headers

__all__ = [
    "CallResult",
    "ContextHost",
    "DeployError",
    "FunctionError",
    "FunctionPool",
    "SandboxUnavailable",
    "filter_headers",
    "inspect_source",
    "probe_sandbox",
    "sandbox_problem",
]
