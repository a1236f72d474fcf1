"""Create and list API keys for `cai serve`.

    python -m serve.keys create alice                # appends to the default keys file
    python -m serve.keys create alice --file keys.txt
    python -m serve.keys list --file keys.txt

A new key is printed once; the file keeps only `alice:sha256:<hex of the key>` (mode 0600).
The default file is $CAI_API_KEYS_FILE, else $XDG_CONFIG_HOME/cai/serve-keys.txt
(~/.config/cai/serve-keys.txt). Keys can also come from the environment:
CAI_API_KEYS="alice:KEY,bob:KEY2".

`list` prints the names and, on stderr, every line the server would skip (exit status 1);
`create` refuses to append to a keys file with such lines and names them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from serve.auth import _OWNER, hash_key, private_file, read_keys_file


def default_keys_file() -> Path:
    if env := os.environ.get("CAI_API_KEYS_FILE"):
        return Path(env)
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "cai" / "serve-keys.txt"


class KeysFileError(ValueError):
    """The keys file has lines the server would skip (or cannot be read)."""


def check_keys_file(file: Path | None = None) -> tuple[list[str], list[str]]:
    """(owner names, problems): the keys the server accepts from the file, one name per key, and
    one "FILE:LINE: what is wrong" per line it skips (the server logs the same and keeps serving)."""
    entries, problems = read_keys_file(file or default_keys_file())
    return [name for name, _ in entries], problems


def problems_text(file: Path, problems: list[str]) -> str:
    return (f"{file} is not a valid keys file; the server skips what is named here "
            f"(fix or delete these lines):\n  " + "\n  ".join(problems))


def create_key(name: str, file: Path | None = None) -> str:
    """Append a new key for `name` to the keys file (created 0600) and return the key.

    A keys file with malformed lines is refused (KeysFileError naming them): a key is never
    appended to a file that is not a valid keys file."""
    if not _OWNER.match(name):
        raise ValueError(f"key name {name!r}: use letters, digits and ._@- (at most 64 characters)")
    file = file or default_keys_file()
    _, problems = check_keys_file(file)
    if problems:
        raise KeysFileError(problems_text(file, problems))
    file.parent.mkdir(parents=True, exist_ok=True)
    key = "cai-" + secrets.token_urlsafe(32)
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+b") as f:
        size, lead = os.fstat(fd).st_size, b""
        if size:  # a last line without its newline would merge with the new one
            f.seek(size - 1)
            lead = b"" if f.read(1) in (b"\n", b"\r") else b"\n"
        f.write(lead + f"{name}:sha256:{hash_key(key)}\n".encode())
    private_file(file)
    return key


def list_keys(file: Path | None = None) -> list[str]:
    """Owner names in the keys file, one per key (the keys themselves are not stored);
    malformed lines are left out (see check_keys_file)."""
    return check_keys_file(file)[0]


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
            return show_keys(args.file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def show_keys(file: Path | None = None) -> int:
    """Print the key names (stdout) and what is wrong with the file (stderr); 1 if anything is."""
    file = file or default_keys_file()
    if not file.exists():
        print(f"error: no keys file at {file}", file=sys.stderr)
        return 1
    names, problems = check_keys_file(file)
    for name in names:
        print(name)
    if problems:
        print(f"error: {problems_text(file, problems)}", file=sys.stderr)
    elif not names:
        print(f"error: {file} holds no keys", file=sys.stderr)
    return 1 if problems or not names else 0


if __name__ == "__main__":
    sys.exit(main())
