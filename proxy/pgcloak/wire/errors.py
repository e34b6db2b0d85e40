"""The codec's single exception type."""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes that do not form a valid protocol 3.0 message.

    ``sqlstate`` is what the session reports to the client before closing
    (08P01 protocol_violation unless a more specific code applies).
    """

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate

    @classmethod
    def bad_length(cls, type_byte: bytes | bytearray | memoryview, length: int, limit: int) -> ProtocolError:
        kind = repr(bytes(type_byte)) if type_byte else "startup packet"
        if length > limit:
            return cls(f"message {kind} declares {length} bytes, over the limit of {limit}", "08P01")
        return cls(f"message {kind} declares an invalid length {length}", "08P01")
