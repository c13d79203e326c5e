"""Peer-to-peer chunk transfer: the transport, the blob transfer driver and the transfer listener.

The replicator (and ``pull`` from the cluster) call:

* :class:`Transfers` — the node's transfers, one per blob digest:
  :meth:`Transfers.fetch_from_peers` (probe peers, fetch from all of them),
  :meth:`Transfers.fetch_blob` (with a known index and sources),
  :meth:`Transfers.active` (progress of each, for status reports);
* :func:`fetch_model` — a whole model (manifest + blobs) from its holders;
* :class:`HttpPeerTransport` — signed requests to peers (:class:`~omx.protocols.PeerTransport`);
  :func:`transfer_address` finds a member's transfer listener in its Serf tags;
* :class:`PeerServer` — the transfer listener that serves the peer endpoints with ``sendfile``.
"""

from __future__ import annotations

from omx.runtime.peer.bandwidth import Bandwidth, TokenBucket
from omx.runtime.peer.fetch import (
    BlobTransfer,
    TransferFailed,
    TransferObserver,
    TransferProgress,
    TransferSettings,
    availability,
    probe_sources,
)
from omx.runtime.peer.model import ModelFetched, fetch_manifest, fetch_model
from omx.runtime.peer.server import PeerServer
from omx.runtime.peer.transfers import Transfers
from omx.runtime.peer.transport import HttpPeerTransport, transfer_address

__all__ = [
    "Bandwidth",
    "BlobTransfer",
    "HttpPeerTransport",
    "ModelFetched",
    "PeerServer",
    "TokenBucket",
    "TransferFailed",
    "TransferObserver",
    "TransferProgress",
    "TransferSettings",
    "Transfers",
    "availability",
    "fetch_manifest",
    "fetch_model",
    "probe_sources",
    "transfer_address",
]
