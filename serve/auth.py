"""API keys, request-size limits and path safety.

Keys: one per line in the keys file, `NAME:sha256:HEX` (what `python -m serve.keys create`
writes) or `NAME:KEY` (plain), plus `NAME:KEY,NAME2:KEY2` in the environment variable
`CAI_API_KEYS`. NAME owns the jobs its keys submit, so two keys with one name share jobs
(key rotation). Every presented key is hashed and compared with every stored hash using
`hmac.compare_digest`, so timing says nothing about which key (or which prefix) matched.
A malformed line of the keys file is skipped with a logged warning naming the line; the
other keys keep working (`cai keys list` names every such line).

Paths: clients name things (datasets, constitutions, export files); they never give
paths. A name is plain segments of [A-Za-z0-9._-] joined by "/"; `..`, absolute paths,
`~`, backslashes and any `%` (URL-encoded traversal, decoded once by the server already)
are refused, and the resolved path (symlinks followed) must stay inside its root.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from pathlib import Path

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("serve")

KEYS_ENV = "CAI_API_KEYS"
MIN_KEY_CHARS = 16
# Routes reachable without a key: the health probe and the review page's static shell (it holds
# no data; it asks for a key and sends it with every API call); with `Settings.docs` (off by
# default: Swagger UI loads its JS/CSS from a public CDN) also the API's schema and /docs.
PUBLIC_PATHS = frozenset({"/healthz", "/", "/ui", "/ui/{asset}"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}$")


class PathRefused(ValueError):
    """A client-supplied name that is not a plain name under its root (HTTP 400)."""


# ---------------------------------------------------------------- keys


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_line(line: str, where: str) -> tuple[str, bytes] | None:
    """(owner name, sha256 digest of the key) for one `NAME:KEY` / `NAME:sha256:HEX` entry."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    name, sep, secret = line.partition(":")
    if not sep or not _OWNER.match(name):
        raise ValueError(f"{where}: expected NAME:KEY or NAME:sha256:HEX (NAME: letters, digits, ._@-)")
    if secret.startswith("sha256:"):
        digest = secret.removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{where}: sha256: must be followed by 64 lowercase hex digits")
        return name, bytes.fromhex(digest)
    if len(secret) < MIN_KEY_CHARS:
        raise ValueError(f"{where}: key of {name!r} is shorter than {MIN_KEY_CHARS} characters")
    return name, hashlib.sha256(secret.encode()).digest()


def read_keys_file(file: Path) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(entries, problems) of a keys file: a malformed line is skipped and named in `problems`
    ("FILE:LINE: what is wrong"; never the line itself, which may hold a key). A file that
    cannot be read is one problem and no entries. A missing file is neither."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"{file}: cannot read the keys file: {exc.strerror or exc}"]
    entries, problems = [], []
    for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):  # a BOM is not a name
        where = f"{file}:{n}"
        try:
            entry = parse_key_line(raw.decode("utf-8"), where)
        except UnicodeDecodeError:
            problems.append(f"{where}: not UTF-8 text")
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if entry is not None:
                entries.append(entry)
    return entries, problems


_WARNED: set[tuple[str, tuple[int, ...]]] = set()


class KeyStore:
    """Keys from a file (re-read when it changes) and from an environment variable.

    A malformed line of the file is skipped with a logged warning naming it (once per change
    of the file); the other keys keep working. Malformed `$CAI_API_KEYS` entries are refused
    at start-up (ValueError)."""

    def __init__(self, file: Path | None, env_value: str | None = None):
        self.file = file
        self._env = [e for part in (env_value or "").split(",")
                     if (e := parse_key_line(part, f"${KEYS_ENV}")) is not None]
        self._file_entries: list[tuple[str, bytes]] = []
        self._stamp: tuple[int, ...] | None = None
        self.problems: list[str] = []

    def _entries(self) -> list[tuple[str, bytes]]:
        if self.file is not None:
            try:
                st = self.file.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_ino)
            except OSError:  # missing (or unreachable): no file keys
                stamp, self._file_entries, self.problems = None, [], []
            if stamp is not None and stamp != self._stamp:
                self._file_entries, self.problems = read_keys_file(self.file)
                if (str(self.file), stamp) not in _WARNED:  # once per version of the file, per process
                    _WARNED.add((str(self.file), stamp))
                    for problem in self.problems:
                        log.warning("keys file: skipped %s", problem)
            self._stamp = stamp
        return self._file_entries + self._env

    def count(self) -> int:
        return len(self._entries())

    def authenticate(self, presented: str) -> str | None:
        """The owner name of a valid key, else None. Compares against every entry, always."""
        digest = hashlib.sha256(presented.encode()).digest()
        owner = None
        for name, stored in self._entries():
            if hmac.compare_digest(digest, stored) and owner is None:
                owner = name
        return owner


_bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer KEY")


def require_owner(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
    """FastAPI dependency: the owner name of the request's API key, or 401."""
    keys: KeyStore = request.app.state.keys
    owner = keys.authenticate(credentials.credentials) if credentials else None
    if owner is None:
        raise HTTPException(401, "missing or invalid API key: send Authorization: Bearer KEY",
                            headers={"WWW-Authenticate": "Bearer"})
    return owner


# ---------------------------------------------------------------- request size


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        payload = f'{{"detail":"request body over {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


# ---------------------------------------------------------------- path safety


def check_name(name: str, what: str = "name") -> str:
    """A plain relative name, or PathRefused."""
    if not name or len(name) > 300 or "\x00" in name:
        raise PathRefused(f"{what}: empty or too long")
    if "%" in name:
        raise PathRefused(f"{what} {name!r}: '%' is not allowed (URL-encoded paths are refused)")
    if name.startswith(("/", "~")) or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise PathRefused(f"{what} {name!r}: give a name under the server's root, not a path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathRefused(f"{what} {name!r}: '..', '.' and empty segments are not allowed")
    if not all(_NAME.match(p) for p in parts):
        raise PathRefused(f"{what} {name!r}: use letters, digits, '.', '_' and '-' (segments joined by '/')")
    return name


def inside(root: Path, path: Path) -> Path:
    """`path` resolved (symlinks followed), if it stays inside `root`; else PathRefused."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise PathRefused(f"{path.name}: leads outside the server's root (symlink)")
    return resolved


def resolve_name(root: Path, name: str, suffixes: tuple[str, ...] = ("",), what: str = "name") -> Path | None:
    """The file or folder `root/name[suffix]` (first that exists), checked; None when none exists."""
    check_name(name, what)
    for suffix in suffixes:
        candidate = root / f"{name}{suffix}"
        if candidate.exists() or candidate.is_symlink():
            return inside(root, candidate)
    return None


def list_names(root: Path, pattern: str = "*") -> list[str]:
    """Names of entries under `root` (one level) that resolve inside it."""
    if not root.is_dir():
        return []
    names = []
    for entry in sorted(root.glob(pattern)):
        try:
            inside(root, entry)
        except (PathRefused, OSError):
            continue
        if _NAME.match(entry.name):
            names.append(entry.name)
    return names


def private_file(path: Path) -> None:
    """Make `path` readable by its owner only (keys files)."""
    try:
        os.chmod(path, 0o600)
    except OSError as exc:  # pragma: no cover - e.g. a filesystem without modes
        log.warning("could not restrict %s to its owner: %s", path, exc)
