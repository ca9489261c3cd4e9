"""The Serve application's config: the `args` block of a `serve run` / RayService application."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    """Requests per replica the autoscaler aims for; batching wants this above 1."""

    @model_validator(mode="after")
    def _check(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class ModelSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The name clients send as `model`."""
    uri: str
    """Model URI: a directory, s3://bucket/prefix or tiny://family."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Concurrent requests merged into one generate call."""
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=5)
    """How long a request may wait for others to fill a batch."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    gpus_per_replica: float = Field(0, ge=0)
    cpus_per_replica: float = Field(0.5, gt=0)


class Limits(_Strict):
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_images: int = Field(4, ge=0)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_tokens: int = Field(512, ge=1)
    max_prompt_chars: int = Field(16_000, ge=1)


class ServeConfig(_Strict):
    models: list[ModelSpec] = Field(min_length=1)
    api_keys: list[str] = Field(default_factory=list)
    """Bearer tokens; MEDRAY_API_KEYS (comma-separated) adds to them. At least one is required."""
    allowed_s3_prefixes: list[str] = Field(default_factory=list)
    """s3:// prefixes that image URLs may point into; empty allows no s3:// images."""
    allow_http_images: bool = False
    """Fetching http(s) image URLs is off by default (SSRF)."""
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _check(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        return self

    def keys(self) -> set[str]:
        env = [k.strip() for k in os.environ.get("MEDRAY_API_KEYS", "").split(",") if k.strip()]
        keys = set(self.api_keys) | set(env)
        if not keys:
            raise ValueError("no API keys: set api_keys in the config or MEDRAY_API_KEYS")
        return keys
