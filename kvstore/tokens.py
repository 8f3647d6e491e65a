"""Bearer tokens for the cache daemon: where they come from and how they are compared.

A token is given directly (config or ``KVCACHE_SERVER_TOKEN``/``KVCACHE_REMOTE_TOKEN``) or
as a file. A token file must be readable by its owner only (mode 0600 or stricter): a
token others can read authorises nothing.
"""

from __future__ import annotations

import hmac
import stat
from pathlib import Path

from kvcache.kvstore.errors import ConfigError

MIN_TOKEN_CHARS = 16


def resolve_token(token: str | None, token_file: Path | None, *, what: str) -> str | None:
    """The token ``what`` uses (None: none configured). ``ConfigError`` when both are set,
    when the file is missing, readable by group or others, or the token is short."""
    if token is not None and token_file is not None:
        raise ConfigError(f"{what}: set token or token_file, not both")
    if token_file is not None:
        try:
            st = token_file.stat()
            text = token_file.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"{what}: cannot read token file {token_file}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{what}: token file {token_file} is accessible to other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}); run chmod 600 {token_file}")
        token = text.strip()
    if token is None:
        return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"{what}: a token needs at least {MIN_TOKEN_CHARS} characters and no spaces; "
            "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def token_matches(expected: str, authorization: str | None) -> bool:
    """Does an ``Authorization`` header carry ``expected``? Constant time in the token."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(expected.encode(), authorization[len("Bearer "):].encode())
