"""Where a constitution's text comes from: a file, a bare name under constitutions/, or
`path@REV` from git; and how a file is named where others read it (never an absolute path)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cai.errors import CaiError

CONSTITUTIONS_DIR = Path(__file__).resolve().parents[1] / "constitutions"


class ConstitutionError(CaiError):
    """A problem in a constitution file, located by file, line and field, with what to do about it."""

    def __init__(self, file: str, line: int | None, field: str | None, message: str):
        super().__init__(file, line, field, message)
        self.file, self.line, self.field, self.message = file, line, field, message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


# --- git

def git(cwd: Path, *args: str) -> str | None:
    """stdout of a git command, or None when git is missing or the command fails."""
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, encoding="utf-8", check=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_location(path: Path) -> tuple[Path, str] | None:
    """(repository top, path relative to it) when `path` lies inside a git work tree."""
    parent = path.absolute().parent
    if not parent.is_dir():
        return None
    out = git(parent, "rev-parse", "--show-toplevel", "--show-prefix")
    if out is None:
        return None
    top, _, prefix = out.partition("\n")
    return Path(top.strip()), prefix.strip() + path.name


def _git_commit_of_working_file(path: Path) -> str | None:
    """Last commit touching the file, if it is tracked and unmodified; else None."""
    location = git_location(path)
    if location is None:
        return None
    top, rel = location
    status = git(top, "status", "--porcelain", "--untracked-files=all", "--", rel)
    if status is None or status.strip():  # modified, staged or untracked
        return None
    return (git(top, "log", "-1", "--format=%H", "--", rel) or "").strip() or None  # empty: ignored, never committed


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    text = str(spec)
    if isinstance(spec, Path) or Path(text).exists() or "@" not in text:
        return _named(Path(text)), None
    path, rev = text.rsplit("@", 1)
    return Path(path), rev


def _named(path: Path) -> Path:
    """A bare name like `harmless` means constitutions/harmless.yaml (here, or in cai's checkout)."""
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    for folder in (Path.cwd() / "constitutions", CONSTITUTIONS_DIR):
        if (folder / f"{path}.yaml").is_file():
            return folder / f"{path}.yaml"
    return path


# --- reading

def read_source(spec: str | Path) -> tuple[str, str, str | None]:
    """(display name, YAML text, git commit) for a path or `path@REV` spec."""
    path, rev = split_spec(spec)
    if rev is None:
        if not path.is_file():
            raise ConstitutionError(str(path), None, None, "no such file — check the path")
        try:
            return str(path), path.read_text(encoding="utf-8"), _git_commit_of_working_file(path)
        except UnicodeDecodeError as exc:
            raise ConstitutionError(str(path), None, None, f"not UTF-8 text ({exc.reason}) — save it as UTF-8")
    display = f"{path}@{rev}"
    location = git_location(path)
    if location is None:
        raise ConstitutionError(display, None, None, "not inside a git repository — drop '@REV' or check the path")
    top, rel = location
    text = git(top, "show", f"{rev}:{rel}")
    if text is None:
        why = f"git cannot show {rel} at '{rev}' — check the revision exists and the file was committed there"
        raise ConstitutionError(display, None, None, why)
    commit = (git(top, "rev-list", "-1", rev, "--", rel) or "").strip() or None
    return display, text, commit


def display_path(path: str | Path) -> str:
    """A file as lineage, reports and data cards name it: a relative path as given, else relative to
    its git work tree (the project) or to the working directory, else its name alone; never an
    absolute local path (records and data cards are read by others, e.g. clients of cai serve)."""
    path = Path(path)
    if not path.is_absolute() and ".." not in path.parts:
        return path.as_posix()
    location = git_location(path)
    if location is not None:
        return location[1]
    try:
        return Path(os.path.abspath(path)).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name
