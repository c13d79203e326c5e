"""The commented ``config.yaml`` that ``omx config init`` writes, per profile (pure).

Every key of :class:`omx.runtime.config.Settings` is listed with a comment; a test
checks that none is missing, so a new setting cannot go undocumented here.
"""

from __future__ import annotations

__all__ = ["PROFILES", "SECTIONS", "render_config"]

# (section, comment, [(key, default YAML literal, comment)])
SECTIONS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("node", "This node.", [
        ("name", "null", "Optional human name shown beside the generated node id (e.g. omx-1a2b3c4d)."),
    ]),
    ("api", "The Ollama-compatible HTTP API (and OpenAI-compatible /v1).", [
        ("host", "127.0.0.1", "Address to bind. 127.0.0.1 keeps a lone node private; 0.0.0.0 listens everywhere."),
        ("port", "8080", "TCP port of the API (HTTP/1.1)."),
        ("advertise", "null", "Address peers use to reach this API (default: the bind address, or the "
                              "first non-loopback one when bound to 0.0.0.0)."),
        ("http3", "true", "Also serve the API as HTTP/3 over QUIC on UDP, with TLS from the cluster CA "
                          "($OMX_HOME/tls/ca.crt; print it with 'omx cluster ca')."),
        ("h3_port", "null", "UDP port of HTTP/3 (default: the same number as port; 0: any free port)."),
    ]),
    ("web", "The web dashboard (cluster, models, traffic, chat), served on the API's bind address.", [
        ("enabled", "true", "Serve the dashboard; false: no web listener."),
        ("port", "8081", "TCP port of the dashboard (0: any free port); 'omx troubleshoot' checks that it is free."),
    ]),
    ("p2p", "Gossip membership (a supervised Serf agent).", [
        ("port", "4001", "Gossip port (TCP and UDP)."),
        ("bind", "null", "Address the gossip listener binds (default: the API bind address)."),
        ("advertise", "null", "Address peers gossip to (never 0.0.0.0; default: the bind address or the "
                              "first non-loopback one)."),
        ("profile", "lan", "Serf timing profile: lan, wan or local (local shortens every timer)."),
        ("join", "[]", "Peers to join at start, as host:port (the cluster secret is needed to join)."),
        ("transfer_port", "0", "TCP port serving peers on the API address: model chunks with sendfile, and "
                               "forwarded calls (0: any free port; peers learn it from the gossip tags)."),
    ]),
    ("models", "The content-addressed model store.", [
        ("store_path", "null", "Where models live (default: $OMX_HOME/data/models)."),
        ("max_cache_size", "10GB", "Size above which least-recently-used models may be evicted "
                                   "(only where another replica exists); 0: no limit. Units: MB, GB, GiB..."),
        ("auto_cleanup", "true", "Evict beyond max_cache_size automatically."),
        ("download_timeout", "30m", "Give up one blob's download from a registry (or its upload by "
                                   "'omx push') after this long (30s, 5m, 1h)."),
        ("concurrency", "3", "Requests in flight at once per blob download (ranges from a registry, "
                             "chunks from peers)."),
        ("chunk_size", "8MiB", "Size of the chunks blobs are split into for peer-to-peer transfer."),
        ("extra_stores", "[]", "Read-only stores to serve from as well, e.g. [~/.ollama/models] (coexist)."),
        ("registry", "registry.ollama.ai", "Registry that 'omx pull' falls back to after the cluster."),
        ("insecure", "false", "Allow plain-HTTP registries."),
    ]),
    ("replication", "How many nodes should hold each model.", [
        ("factor", "2", "Desired replicas per model (1-16); the last replica is never removed."),
        ("max_bandwidth", "0", "Most bytes per second received from peers, all transfers together, "
                               "e.g. 10MB/s (0: unlimited)."),
        ("max_factor", "4", "Replicas follow demand: while requests for a model wait on every holder, a copy "
                            "is added on an idle node with room, up to this many holders (1: never)."),
        ("idle_after", "10m", "A copy added for demand is dropped after this long without a request "
                              "(never below factor)."),
    ]),
    ("routing", "Which node serves a request (any node answers for any model).", [
        ("queue_timeout", "30s", "When every holder of a model is busy, a request waits this long for a free "
                                 "slot anywhere, then gets 503 with Retry-After (at most engine.max_queue wait; "
                                 "0: queue on the best holder at once)."),
    ]),
    ("engine", "Inference.", [
        ("backend", "llama_cpp", "llama_cpp (llama-cpp-python) or ctransformers."),
        ("num_parallel", "1", "Requests served at once per loaded model (sequences of one context, decoded "
                              "together; its KV cache holds num_ctx tokens for each)."),
        ("max_loaded_models", "3", "Models kept in memory at once; the least recently used is unloaded."),
        ("keep_alive", "5m", "How long an idle model stays loaded (-1: forever, 0: unload at once)."),
        ("max_queue", "512", "Requests waiting for a slot before the node answers 503."),
        ("num_thread", "null", "CPU threads of a runner (default: chosen by the backend)."),
        ("num_ctx", "4096", "Default context length in tokens (a model's PARAMETER num_ctx or a request's "
                            "options.num_ctx wins; never past the length the model was trained for)."),
        ("num_gpu", "null", "Layers offloaded to the GPU when a model or request sets no num_gpu (null: as many "
                            "as fit in free VRAM, when llama-cpp-python was built with a GPU backend; 0: none)."),
        ("batching", "true", "llama_cpp: continuous batching of parallel requests in one context "
                             "(false: one context per parallel slot)."),
        ("kv_unified", "false", "llama_cpp with batching: one KV cache of num_ctx x num_parallel tokens shared by "
                                "up to max_sequences requests, admitted by the room left in it (more short "
                                "requests at once in the same memory; outputs may differ slightly from a lone "
                                "run). false: num_ctx tokens of cache for each of num_parallel sequences."),
        ("max_sequences", "null", "With kv_unified: requests decoded together per loaded model (null: 4 x "
                                  "num_parallel; at most 256)."),
    ]),
    ("security", "Client access.", [
        ("api_keys", "[]", "When set, client endpoints need 'Authorization: Bearer KEY'."),
        ("admin_keys", "[]", "Keys that may also administer the cluster (/api/cluster/*: token, join, leave); "
                             "with any key set, only these may. With none set, only this machine may."),
        ("trusted_proxies", "[]", "Reverse proxies (IPs or CIDRs) whose X-Forwarded-For names the client. "
                                  "A proxy on this machine must be listed, or every client counts as local."),
        ("metrics_public", "true", "Serve /metrics without an API key (false: it needs one when keys are set)."),
    ]),
    ("cluster", "Cluster membership secret.", [
        ("secret_file", "null", "The cluster secret (default: $OMX_HOME/cluster/secret, mode 0600)."),
        ("token", "null", "A join token from 'omx cluster token' (seeds + secret); prefer --token or a secret_file."),
    ]),
    ("peer", "Traffic between nodes.", [
        ("transport", "http1", "Chunk transfers and forwarded calls: http1 (TCP; the transfer listener sends "
                               "chunks with sendfile) or http3 (QUIC to each peer's HTTP/3 port, verified against "
                               "the cluster CA; a peer with api.http3 off is reached over http1)."),
    ]),
]

# profile -> {"section.key": (YAML literal, extra comment or "")}
PROFILES: dict[str, dict[str, tuple[str, str]]] = {
    "default": {},
    "gpu": {
        "models.max_cache_size": ("100GB", ""),
        "engine.num_parallel": ("4", "Four requests at once per model, batched in one context on the GPU."),
        "engine.max_loaded_models": ("4", ""),
        "engine.num_ctx": ("8192", "Larger default context (the KV cache holds it for every parallel request)."),
        "engine.keep_alive": ("30m", "Keep models loaded longer between requests."),
        "engine.num_gpu": ("null", "As many layers on the GPU as fit in free VRAM (needs llama-cpp-python "
                                   "built with CUDA, ROCm or Vulkan; a CPU-only build offloads nothing)."),
    },
    "edge": {
        "models.max_cache_size": ("2GB", "Small disk: keep only a little."),
        "models.concurrency": ("1", ""),
        "engine.num_parallel": ("1", ""),
        "engine.max_loaded_models": ("1", "One model in memory at a time."),
        "engine.num_ctx": ("2048", ""),
        "engine.max_queue": ("16", ""),
        "engine.keep_alive": ("1m", "Free memory quickly."),
    },
    "production": {
        "api.host": ("0.0.0.0", "Listens on every interface: set security.api_keys and a firewall."),
        "p2p.bind": ("0.0.0.0", "Gossip on every interface; set p2p.advertise if the first "
                                "non-loopback address is not the one peers reach."),
        "models.max_cache_size": ("200GB", ""),
        "models.auto_cleanup": ("true", "Evict least-recently-used models where other replicas exist."),
        "replication.factor": ("3", "Survive the loss of two nodes."),
        "engine.num_parallel": ("2", ""),
        "engine.keep_alive": ("30m", ""),
        "engine.max_queue": ("1024", ""),
    },
}


def render_config(profile: str) -> str:
    """The commented YAML text of a profile."""
    changes = PROFILES[profile]
    out = [
        f"# omx node configuration (profile: {profile})",
        "#",
        "# Read from $OMX_HOME/config.yaml (default ~/.ollamamax) or 'omx start --config PATH'.",
        "# Environment variables override it (OMX_API__PORT=9000, OMX_MODELS__STORE_PATH=...),",
        "# and 'omx start' flags override both. Check a file with 'omx config validate'.",
    ]
    for section, section_comment, keys in SECTIONS:
        out += ["", f"# {section_comment}", f"{section}:"]
        for key, default, comment in keys:
            value, extra = changes.get(f"{section}.{key}", (default, ""))
            out.append(f"  # {comment}")
            if extra:
                out.append(f"  # {profile}: {extra}")
            out.append(f"  {key}: {value}")
    return "\n".join(out) + "\n"
