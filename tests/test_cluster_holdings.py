"""The extended inventory: a node's holdings kept current, served to peers, parsed back, snapshotted."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from omx.mesh import MemberState, read_secret, sign
from omx.runtime.cluster.inventory import LocalInventory, PeerInventory, snapshot_of
from omx.storage import CONFIG_MEDIA_TYPE, MEDIA_MODEL, Layer, Manifest, ModelName, ModelStore
from omx.storage.holdings import FactorOverride
from omx.storage.holdings_meta import HoldingsMeta
from omx.storage.holdings_wire import holdings_from_json
from tests.support.cluster import Cluster, cluster3  # noqa: F401
from tests.support.placement import holdings, model

CS = 64 * 1024


def _create(store: ModelStore, name: str, payload: bytes) -> None:
    config = store.blobs.write_bytes(b'{"model_format":"gguf"}')
    weights = store.blobs.write_bytes(payload)
    store.write_manifest(ModelName.parse(name), Manifest(
        config=Layer(CONFIG_MEDIA_TYPE, config.digest, config.size),
        layers=(Layer(MEDIA_MODEL, weights.digest, weights.size),)))


async def test_local_inventory_version_follows_holdings_not_use_times(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", chunk_size=CS)
    meta = HoldingsMeta(store.root, touch_every_s=0.0)
    inv = LocalInventory(store, meta, cache_limit=10**12)
    await inv.refresh()
    assert inv.version == "0" and inv.models == []
    _create(store, "tiny", os.urandom(2 * CS))
    assert await inv.refresh() is True
    version = inv.version
    assert len(version) == 16 and [m["name"] for m in inv.models] == ["tiny:latest"]
    assert await inv.refresh() is False

    held = inv.holdings.models[0]
    meta.record(held.name, held.digest, origin="user", created_at=held.created_at, now=held.last_used)
    await inv.refresh()
    meta.touch("tiny", held.last_used + 500.0)  # written at once (touch_every_s=0): the store signature moves
    assert await inv.refresh() is False and inv.version == version
    current = inv.current()
    assert current.models[0].last_used == held.last_used + 500.0 and current.free_bytes > 0
    assert current.version == version

    meta.set_factor("tiny", 3, 1.0)  # a factor override is part of the version
    assert await inv.refresh() is True and inv.version != version

    doc = inv.to_json()
    assert doc["version"] == inv.version
    assert holdings_from_json(doc) == inv.current()


def test_snapshot_of_members_and_cached_peer_holdings() -> None:
    mine = holdings(model("m"))
    theirs = holdings(model("m", origin="replica"), factors=[FactorOverride("m:latest", 1, 5.0)])

    def member(name: str, status: str) -> MemberState:
        return MemberState(name, "127.0.0.1", 4001, status, {}, 0.0)  # type: ignore[arg-type]

    peers = {"b": PeerInventory("v", ("m:latest",), None, 0.0, holdings=theirs),
             "c": PeerInventory("", (), None, 0.0, error="unreachable")}
    snap = snapshot_of("a", mine, [member("a", "alive"), member("b", "alive"), member("c", "alive"),
                                   member("d", "failed")], peers)
    assert [(n.node, n.alive, n.holdings) for n in snap.nodes] == [
        ("a", True, mine), ("b", True, theirs), ("c", True, None), ("d", False, None)]
    assert snap.factors()["m:latest"].factor == 1
    alone = snapshot_of("a", mine, [], {})
    assert [n.node for n in alone.nodes] == ["a"]


@pytest.mark.serf
@pytest.mark.e2e
def test_a_real_node_serves_its_holdings_with_the_gossiped_version(cluster3: Cluster) -> None:  # noqa: F811
    a = cluster3[0]
    key = read_secret(a.secret_path).peer_auth_key()
    response = httpx.get(a.url + "/api/peer/inventory", headers=sign(key, "omx-00000000", "GET",
                                                                     "/api/peer/inventory"))
    assert response.status_code == 200, response.text
    body = response.json()
    parsed = holdings_from_json(body)
    assert body["version"] == parsed.version and body["node_id"] == a.node_id
    assert parsed.free_bytes > 0 and parsed.cache_limit is not None
    deadline = time.monotonic() + 40.0
    while time.monotonic() < deadline:  # the tag follows the served version (after any recent change)
        seen = {o.nodes()[a.node_id]["inventory_version"] for o in cluster3.nodes}
        if seen == {parsed.version}:
            break
        time.sleep(0.2)
    assert seen == {parsed.version}


@pytest.mark.parametrize(("size", "limit"), [("0", None), ("1GB", 10**9)])
def test_max_cache_size_zero_means_no_limit_for_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           size: str, limit: int | None) -> None:
    from omx.runtime.config import load_settings
    from omx.runtime.node import Node

    monkeypatch.setenv("OMX_HOME", str(tmp_path))
    monkeypatch.setenv("OMX_MODELS__MAX_CACHE_SIZE", size)
    node = Node(load_settings())
    asyncio.run(node.cluster.local.refresh())
    holdings = node.cluster.local.current()
    assert holdings.cache_limit == limit
    assert holdings.room > 0
