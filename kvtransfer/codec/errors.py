"""The one exception the codec raises for bad input or bad streams."""

from __future__ import annotations


class CodecError(ValueError):
    """A KV stream or tensor the codec refuses: corrupted, truncated, mismatched, or non-finite.

    The message names what is wrong (which layer, which field, expected vs found) so the
    transfer layer can log it and fall back to a resend or a lossless level.
    """
