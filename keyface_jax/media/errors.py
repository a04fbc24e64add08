"""The one exception type of the media package."""


class MediaError(Exception):
    """A file cannot be used: unreadable, corrupt, missing a stream, silent, ... The message is a
    short human-readable reason (it ends up in the preparation summary)."""
