"""Who a request comes from, as the server sees it: the identity rankings and limits apply to.

A client's ``user`` field is a label it chooses (any number of them, for free), so nothing that
must hold per person may rest on it: not the one-ranking-per-completion rule, not the rate
limits, not how much of a learning round one source may own. The identity is derived by the
server from what the client cannot multiply at will:

- with API keys on (``LOOPCHAT_API_KEYS``), the key it authenticated with: ``key:<hash>``, a
  SHA-256 prefix, so neither Redis nor the feedback stream ever holds a key;
- with keys off, the client's network address: ``addr:<ip>``. The chat page's Gradio session id
  is not used: the browser makes it up, so a script could start a fresh "session" per request.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

KEY_HASH_HEX = 24  # 96 bits of SHA-256: no two configured keys collide


def key_identity(api_key: str) -> str:
    """The identity of a caller holding ``api_key`` (a hash: the key is never stored)."""
    digest = hashlib.sha256(api_key.encode("utf-8", "replace")).hexdigest()
    return f"key:{digest[:KEY_HASH_HEX]}"


def client_identity(api_key: str | None, address: str | None) -> str:
    """The identity of a request: its API key's hash, else its client address."""
    if api_key is not None:
        return key_identity(api_key)
    return f"addr:{address or 'unknown'}"


def matching_key(presented: str | bytes, keys: Sequence[str]) -> str | None:
    """The configured key equal to ``presented`` (constant-time per key), or None.

    Compared as bytes (a ``str`` as UTF-8): ``hmac.compare_digest`` refuses ``str`` with
    non-ASCII characters (a TypeError, which was a 500 for a bearer token such as ``ключ``).
    """
    given = presented if isinstance(presented, bytes) else presented.encode("utf-8", "replace")
    for key in keys:
        if hmac.compare_digest(given, key.encode("utf-8", "replace")):
            return key
    return None
