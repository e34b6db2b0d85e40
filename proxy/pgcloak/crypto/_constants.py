"""Format constants shared by the envelope and blind-index modules.

Kept in one place so that ``envelope`` can recognize a stored
``<index>.<envelope>`` value without importing ``blind_index`` (and vice versa).
"""

from __future__ import annotations

from typing import Final

#: ASCII prefix of every envelope; its trailing digit is the format version.
ENVELOPE_PREFIX_TEXT: Final = "pgc1:"
ENVELOPE_PREFIX: Final = ENVELOPE_PREFIX_TEXT.encode("ascii")

#: Bytes of HMAC-SHA256 output kept in a blind index (128 bits).
INDEX_BYTES: Final = 16
#: Characters of a blind index: unpadded base64url of ``INDEX_BYTES`` bytes.
INDEX_LENGTH: Final = 22
#: Between the blind index and the envelope. Not in the base64url alphabet.
INDEX_SEPARATOR: Final = "."
