"""megamlm's user-facing errors: a problem with the user's input, files or setup (a config key, a shard, a
checkpoint, a launcher variable), whose message names the file, the key or the value and says what to do.
The CLI prints any :class:`MegamlmError` as one line, without a traceback; anything else is a bug and
keeps its traceback."""

from __future__ import annotations

__all__ = ["MegamlmError"]


class MegamlmError(Exception):
    """Base of every user-facing error (each subclass also derives from the builtin it refines, e.g.
    ``ConfigError(MegamlmError, ValueError)``)."""
