"""SHA-256 without loading OpenSSL on the hot path.

``import hashlib`` loads libcrypto: 4-10 ms measured here, on every ``supervise -- true``.
CPython's own builtin SHA-256 module (``_sha2`` from 3.12, ``_sha256`` in 3.11) gives the
same digests and imports in about 1 ms.  hashlib stays the fallback.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hashlib import sha256
else:
    try:
        from _sha2 import sha256  # 3.12+
    except ImportError:
        try:
            from _sha256 import sha256  # 3.11
        except ImportError:  # a build without the builtin modules
            from hashlib import sha256

__all__ = ["sha256"]
