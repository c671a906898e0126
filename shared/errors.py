"""The splitmq error hierarchy.

pika exceptions never leave ``shared.broker``; callers see these, raised with ``from``.
"""
from __future__ import annotations


class SplitMQError(Exception):
    """Base class of every error splitmq raises on purpose."""


class ConfigError(SplitMQError, ValueError):
    """A job configuration is invalid, or disagrees with a peer's."""


class DecodeError(SplitMQError):
    """Bytes from a peer are not a valid message. Retrying cannot fix it: dead-letter."""


class RejectedMessage(SplitMQError):
    """A decoded message failed validation; ``reason`` is a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BrokerError(SplitMQError):
    """The broker could not be reached or refused an operation."""


class AccessRefused(BrokerError):
    """The broker refused this user an operation (permissions, bad credentials)."""


class Unroutable(BrokerError):
    """A mandatory message matched no queue: the peer's queue is missing."""


class PublishNacked(BrokerError):
    """The broker negatively acknowledged a publish (e.g. a full queue)."""


class RemoteError(SplitMQError):
    """A peer reported an error about one of our messages."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(f"{kind}: {text}")
        self.kind = kind
        self.text = text
