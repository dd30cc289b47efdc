"""Errors a user can act on: each names the field at fault and the fix."""


class SplitserveError(Exception):
    """Base class for errors splitserve reports to users."""


class ConfigError(SplitserveError, ValueError):
    """A configuration value is missing, unknown or impossible."""


class RequestError(SplitserveError, ValueError):
    """A request is malformed (empty prompt, too long, bad sampling params)."""


class OutOfBlocksError(SplitserveError, RuntimeError):
    """The KV cache cannot hold a request, even when empty."""


class MissingDependencyError(SplitserveError, ImportError):
    """An optional package or file is missing; the message says how to install it."""
