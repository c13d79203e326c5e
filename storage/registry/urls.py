"""Where a model lives on its registry: the distribution API's URLs for one repository."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urljoin

from omx.types import BlobDigest

from ..names import ModelName

__all__ = ["RegistryEndpoint"]


@dataclass(frozen=True)
class RegistryEndpoint:
    """The repository ``<namespace>/<model>`` on ``scheme://host`` (host may carry a port)."""

    scheme: str
    host: str
    repository: str
    tag: str

    @classmethod
    def for_model(cls, name: ModelName, *, insecure: bool = False) -> RegistryEndpoint:
        """``https`` unless ``insecure`` allows plain HTTP, as Ollama's ``--insecure`` does."""
        return cls("http" if insecure else "https", name.host, f"{name.namespace}/{name.model}", name.tag)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def manifest_url(self) -> str:
        return f"{self.base}/v2/{self.repository}/manifests/{self.tag}"

    def blob_url(self, digest: BlobDigest) -> str:
        return f"{self.base}/v2/{self.repository}/blobs/{digest}"

    @property
    def uploads_url(self) -> str:
        return f"{self.base}/v2/{self.repository}/blobs/uploads/"

    def resolve(self, location: str) -> str:
        """An upload ``Location`` may be relative to the registry: make it absolute."""
        return urljoin(self.base + "/", location)

    @property
    def pull_scope(self) -> str:
        return f"repository:{self.repository}:pull"

    @property
    def push_scope(self) -> str:
        return f"repository:{self.repository}:pull,push"
