"""Typed exceptions of the store.

Every error a user can cause says what happened and what to do about it. Callers catch
``KVCacheError`` for "anything kvcache refused"; the subclasses say why.
"""

from __future__ import annotations


class KVCacheError(Exception):
    """Base class of every error kvcache raises on purpose."""


class ConfigError(KVCacheError, ValueError):
    """A configuration value is invalid; the message names the key and what to fix."""


class LayoutMismatchError(KVCacheError, ValueError):
    """A tensor's dtype, shape or layout does not match the ``KVLayout`` it was put with."""


class UnknownCodecError(KVCacheError, KeyError):
    """A codec name is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptObjectError(KVCacheError):
    """Stored bytes failed to decode: truncated, checksum mismatch, or a foreign format."""


class InvalidKeyError(KVCacheError, ValueError):
    """A key is not a key: store keys are 32 lowercase hex digits (``kvcache.kvstore.keys``)."""


class UnencodableChunkError(KVCacheError, ValueError):
    """A chunk holds values its codec cannot store faithfully (e.g. NaN or inf for a codec
    without escapes); the put stores nothing."""


class StoreCorruptError(KVCacheError):
    """The store's index is damaged; the message says how to check and rebuild it
    (``kvcache fsck --repair``)."""


class StoreFullError(KVCacheError):
    """No room for an object even after evicting everything evictable (pinned or in use)."""


class ObjectTooLargeError(StoreFullError):
    """One object is larger than a tier's whole capacity."""


class StoreUnavailableError(KVCacheError):
    """The store directory is missing, unreadable, read-only or locked by another writer."""


class DiskFullError(StoreFullError):
    """The file system (or the LMDB map) has no room left for this write."""


class EntryPinnedError(KVCacheError):
    """An operation would remove a pinned entry; pass ``force`` to override."""


class NoMatchError(KVCacheError):
    """An eviction filter matched nothing in the store."""
