"""Work-arounds for the CPU paths of the bundled llama.cpp, applied where models load.

On a CPU that advertises Intel AMX, llama.cpp puts quantized weights in its AMX
buffer type and multiplies them with tile instructions that die with SIGILL in
this build (its worker threads run ``tilezero`` without a valid tile
configuration; ggml-org/llama.cpp#26954). The AMX buffer type is one of the
"extra" CPU buffer types, so loading with ``use_extra_bufts`` off keeps
llama.cpp on its AVX-512/AVX2 kernels there. Elsewhere nothing changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["amx_advertised", "avoid_broken_amx"]

_CPUINFO = Path("/proc/cpuinfo")


def amx_advertised(cpuinfo: Path = _CPUINFO) -> bool:
    """Whether the CPU flags list AMX tiles (Linux; False where they cannot be read)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return "amx_tile" in line.split(":", 1)[-1].split()
    return False


def avoid_broken_amx(llama_cpp_module: Any | None = None, *, advertised: bool | None = None) -> bool:
    """Make every model this process loads skip llama.cpp's extra CPU buffer types when
    the CPU advertises AMX; returns whether it did. Idempotent; call before loading."""
    if not (amx_advertised() if advertised is None else advertised):
        return False
    module: Any = llama_cpp_module
    if module is None:
        import llama_cpp.llama_cpp as lib

        module = lib
    defaults = module.llama_model_default_params
    if getattr(defaults, "_omx_no_extra_bufts", False):
        return True

    def without_extra_bufts() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    without_extra_bufts._omx_no_extra_bufts = True  # type: ignore[attr-defined]
    module.llama_model_default_params = without_extra_bufts
    return True
