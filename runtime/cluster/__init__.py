"""The node's cluster service: Serf membership, inventories, events and metrics.

:class:`ClusterService` is what :mod:`omx.runtime.node` wires in; it
implements the handlers' :class:`omx.functions.cluster_view.ClusterView`.
:func:`resolve_secret` decides where the cluster secret comes from.
"""

from __future__ import annotations

from omx.runtime.cluster.keys import SECRET_ENV, SecretResolution, persist_secret, resolve_secret
from omx.runtime.cluster.service import ClusterService
from omx.runtime.cluster.topology import Topology

__all__ = ["SECRET_ENV", "ClusterService", "SecretResolution", "Topology", "persist_secret", "resolve_secret"]
