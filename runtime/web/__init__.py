"""The web dashboard: the page's static files, shipped in this package, and the API beside them."""

from omx.runtime.web.dashboard import WS_PROTOCOL, DashboardApp

__all__ = ["WS_PROTOCOL", "DashboardApp"]
