"""API keys as digests: parsing, checking a presented key, and the ids clients are known by.

Owns: turning configured keys (plain text or `sha256:<hex>` digests, from flags,
THOR_API_KEY or a key file) into sha256 digests, refusing empty keys with an error
that names the source and the fix, constant-time checking of a presented Bearer key
(`ApiKeys.identify`, `hmac.compare_digest` against every configured digest, no early
exit), and the key id (`key:` + the first 16 hex digits of the digest) that rate
limits and traces use. Only digests are kept: the running server holds no key in
clear, and nothing a client sends is written to the store in clear.

Does not own: where keys come from (settings.py), the HTTP side of auth (admission/guards.py) or
the bind-address policy (__main__.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DIGEST_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def key_digest(key: str) -> str:
    """`sha256:<hex>` of a key in clear."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def normalize_key(entry: str, source: str) -> str:
    """A configured key entry as a digest: a key in clear is hashed, a `sha256:<hex>` entry kept.

    ValueError for an empty entry (it would let a client in with an empty Bearer key, or
    leave the server open) or a malformed digest, naming `source` and the fix."""
    value = entry.strip()
    if not value:
        raise ValueError(
            f"{source}: an API key is empty. Remove the empty entry, or give no key at all to run an "
            "open server (bound to 127.0.0.1 only)."
        )
    if value.startswith(DIGEST_PREFIX):
        hexpart = value[len(DIGEST_PREFIX) :].lower()
        if not _HEX64.fullmatch(hexpart):
            raise ValueError(
                f"{source}: {value[:20]}... is not a sha256 digest (expected sha256: and 64 hex digits; "
                "make one with `python -m server.admission.keys KEY`)"
            )
        return DIGEST_PREFIX + hexpart
    return key_digest(value)


def read_key_file(path: Path) -> list[str]:
    """Digests of the keys in a key file: one key (or `sha256:<hex>`) per line; blank lines
    and lines starting with `#` are ignored. ValueError when the file holds no key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--api-key-file {path}: cannot read it ({exc.strerror or exc})") from exc
    digests = [
        normalize_key(line, f"--api-key-file {path} line {n}")
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not digests:
        raise ValueError(
            f"--api-key-file {path}: the file holds no API key, so the server would be open. "
            "Put one key per line, or drop --api-key-file to run an open server on 127.0.0.1."
        )
    return digests


def key_id(digest: str) -> str:
    """The id a key is known by in rate limits, traces and logs (not a secret)."""
    return "key:" + digest.removeprefix(DIGEST_PREFIX)[:16]


class ApiKeys:
    """The accepted keys, as digests only. Empty = no auth (an open server)."""

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self._digests = tuple(sorted({normalize_key(d, "API keys") for d in digests}))
        for d in self._digests:
            if not d.startswith(DIGEST_PREFIX):  # pragma: no cover - normalize_key always returns digests
                raise ValueError("ApiKeys holds digests only")

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def ids(self) -> list[str]:
        return [key_id(d) for d in self._digests]

    def identify(self, presented: str) -> str | None:
        """The key id of a presented Bearer key, or None when it matches no configured key.

        The presented key is hashed and compared with every configured digest in constant
        time, without stopping at a match, so timing reveals neither which key matched nor
        how much of it."""
        if not presented or not self._digests:
            return None
        candidate = key_digest(presented).encode()
        found: str | None = None
        for d in self._digests:
            if hmac.compare_digest(candidate, d.encode()):
                found = d
        return None if found is None else key_id(found)


KEY_ID_SCOPE = "thor_key_id"  # where guards.authenticate puts the key id in the ASGI scope's "state"


def address_id(scope: Mapping[str, Any]) -> str:
    """`addr:` + the client's address: the socket peer (proxy headers count only from configured
    proxies), an IPv4-mapped IPv6 address as IPv4, other IPv6 addresses by their /64 network (one
    host usually owns a whole /64, so single addresses would be free fresh identities)."""
    client = scope.get("client")
    host = str(client[0]) if client else "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "addr:" + host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "addr:" + str(ip.ipv4_mapped)
        return "addr:" + str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return "addr:" + str(ip)


def client_id(scope: Mapping[str, Any]) -> str:
    """Who a request counts as for rate limits and trace ownership: the key id the auth
    dependency found when auth is on, the client's address otherwise. Never anything the
    client chose freely (an arbitrary Bearer string on an open server is ignored)."""
    state = scope.get("state") or {}
    found = state.get(KEY_ID_SCOPE)
    return str(found) if found else address_id(scope)


def main(argv: list[str] | None = None) -> int:
    """`python -m server.admission.keys KEY...`: print the `sha256:` digest of each key, for a key file."""
    import sys

    keys = sys.argv[1:] if argv is None else argv
    if not keys:
        print(
            "usage: python -m server.admission.keys KEY [KEY...]  (prints sha256:<hex> lines for --api-key-file)",
            file=sys.stderr,
        )
        return 2
    for k in keys:
        try:
            print(normalize_key(k, "key"))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
