"""Request bodies of the Ollama API, validated at the edge.

Field names and types follow Ollama's ``api/types.go``; unknown fields are
ignored as Ollama's JSON decoding ignores them, and so is a field sent as
``null`` (Go leaves the field unset, so Ollama applies its default): clients
such as LangChain send every field they know, unset ones as ``null``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omx.storage.create import CreateRequest as StoreCreateRequest

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CopyRequest",
    "CreateRequest",
    "DeleteRequest",
    "EmbedRequest",
    "EmbeddingsRequest",
    "GenerateRequest",
    "PullRequest",
    "PushRequest",
    "ShowRequest",
    "null_is_unset",
]

KeepAlive = float | int | str | None
Format = Literal["json", ""] | dict[str, Any] | None


def null_is_unset(data: Any) -> Any:
    """A JSON object without its ``null`` members: a field sent as ``null`` takes its default."""
    if isinstance(data, dict) and None in data.values():
        return {key: value for key, value in data.items() if value is not None}
    return data


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return null_is_unset(data)


class _NamedModel(_Body):
    """Bodies that name one model as ``model`` or, in older clients, ``name``."""

    model: str = ""
    name: str = ""

    @model_validator(mode="after")
    def _model_or_name(self) -> _NamedModel:
        if not self.model and self.name:
            self.model = self.name
        return self


class ToolCallFunction(_Body):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class ToolCall(_Body):
    function: ToolCallFunction


Role = Literal["system", "user", "assistant", "tool"]
"""The roles of Ollama's chat messages."""


class ChatMessage(_Body):
    role: Role
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class GenerateRequest(_NamedModel):
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool = True
    raw: bool = False
    format: Format = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None


class ChatRequest(_NamedModel):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    stream: bool = True
    format: Format = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None


class EmbedRequest(_NamedModel):
    input: str | list[str] = ""
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsRequest(_NamedModel):
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class ShowRequest(_NamedModel):
    verbose: bool = False
    system: str | None = None
    template: str | None = None
    options: dict[str, Any] | None = None


class DeleteRequest(_NamedModel):
    pass


class CopyRequest(_Body):
    source: str
    destination: str


class CreateRequest(_NamedModel, StoreCreateRequest):
    """The store's create request, plus what only the HTTP edge reads."""

    model: str = ""
    name: str = ""
    path: str | None = None
    stream: bool = True


class PullRequest(_NamedModel):
    insecure: bool = False
    stream: bool = True
    username: str | None = None
    password: str | None = None


class PushRequest(PullRequest):
    pass
