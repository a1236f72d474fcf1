"""Create and list API keys for `cai serve`.

    python -m serve.keys create alice                # appends to the default keys file
    python -m serve.keys create alice --file keys.txt
    python -m serve.keys list --file keys.txt

A new key is printed once; the file keeps only `alice:sha256:<hex of the key>` (mode 0600).
The default file is $CAI_API_KEYS_FILE, else $XDG_CONFIG_HOME/cai/serve-keys.txt
(~/.config/cai/serve-keys.txt). Keys can also come from the environment:
CAI_API_KEYS="alice:KEY,bob:KEY2".
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from serve.auth import _OWNER, hash_key, parse_key_line, private_file


def default_keys_file() -> Path:
    if env := os.environ.get("CAI_API_KEYS_FILE"):
        return Path(env)
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "cai" / "serve-keys.txt"


def create_key(name: str, file: Path | None = None) -> str:
    """Append a new key for `name` to the keys file (created 0600) and return the key."""
    if not _OWNER.match(name):
        raise ValueError(f"key name {name!r}: use letters, digits and ._@- (at most 64 characters)")
    file = file or default_keys_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    key = "cai-" + secrets.token_urlsafe(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{name}:sha256:{hash_key(key)}\n")
    private_file(file)
    return key


def list_keys(file: Path | None = None) -> list[str]:
    """Owner names in the keys file, one per key (the keys themselves are not stored)."""
    file = file or default_keys_file()
    if not file.is_file():
        return []
    lines = file.read_text(encoding="utf-8").splitlines()
    return [e[0] for n, line in enumerate(lines, 1) if (e := parse_key_line(line, f"{file}:{n}"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.keys", description="API keys for cai serve")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key, print it once, store its hash")
    create.add_argument("name", help="who the key belongs to; owns the jobs it submits")
    create.add_argument("--file", type=Path, default=None, help=f"keys file (default {default_keys_file()})")
    show = sub.add_parser("list", help="list the key names in a keys file")
    show.add_argument("--file", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            key = create_key(args.name, args.file)
            print(key)
            print(f"stored sha256 of the key for {args.name!r} in {args.file or default_keys_file()}; "
                  "this is the only time the key is shown", file=sys.stderr)
        else:
            for name in list_keys(args.file):
                print(name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
