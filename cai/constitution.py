"""Load, validate, hash, sample and diff YAML constitutions.

The file format is described in the header of ``constitutions/harmless.yaml``.
A spec is a path, or ``path@REV`` for the file as committed at a git revision.
The content sha256 is taken over the *normalised* content (the validated model
as sorted JSON), so comments, formatting and key order never change it.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cai.constitution_source import (  # noqa: F401  (CONSTITUTIONS_DIR, display_path: part of this module's API)
    CONSTITUTIONS_DIR,
    ConstitutionError,
    display_path,
    git,
    git_location,
    read_source,
    split_spec,
)
from cai.records import ConstitutionRef, check_unicode, sha256_text

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Slug = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")]
SemVer = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)){2}$")]


def _duplicates(ids: list[object]) -> list[tuple[int, object, int]]:
    """(index, id, index of first use) for every repeated id."""
    first: dict[object, int] = {}
    return [(index, pid, first[pid]) for index, pid in enumerate(ids) if first.setdefault(pid, index) != index]


def _duplicate_message(pid: object, first: int) -> str:
    return f"duplicate principle id '{pid}' (already used by principles[{first}]) — give each principle a unique id"


class FewShotExample(BaseModel):
    """One worked critique-then-revise example shown to the model before the real task."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text
    answer: Text
    critique: Text
    revision: Text


class Directions(BaseModel):
    """A principle's two steering instructions for contrastive pairs (RLCD, Yang et al. 2023): the
    policy answers once told `toward` (the chosen answer) and once told `away` (the rejected one)."""

    model_config = ConfigDict(extra="forbid")
    toward: Text
    away: Text

    @model_validator(mode="after")
    def _differ(self) -> Directions:
        if self.toward == self.away:
            raise PydanticCustomError("same_directions", "toward and away are the same text — the away "
                                      "direction must ask for the opposite behaviour")
        return self


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Slug
    critique_request: Text
    revision_request: Text
    comparison_question: Text
    directions: Directions | None = None
    tags: list[Text] = []
    examples: list[FewShotExample] = []


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Slug
    version: SemVer
    description: Text
    principles: list[Principle]

    @field_validator("principles")
    @classmethod
    def _unique_nonempty(cls, principles: list[Principle]) -> list[Principle]:
        if not principles:
            raise PydanticCustomError("no_principles", "must list at least one principle")
        for index, pid, first in _duplicates([p.id for p in principles])[:1]:
            raise PydanticCustomError("duplicate_id", _duplicate_message(pid, first))
        return principles

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        major, minor, patch = (int(part) for part in self.version.split("."))
        return major, minor, patch

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def principle(self, id: str) -> Principle:
        for p in self.principles:
            if p.id == id:
                return p
        raise KeyError(f"no principle '{id}' in {self.name} v{self.version}; known ids: {', '.join(self.ids)}")

    def content_sha256(self) -> str:
        """sha256 of the normalised content: independent of comments, layout and key order. An absent
        optional field (`directions: None`) is left out, so adding that field kept every old hash."""
        payload = json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return sha256_text(payload)


class LoadedConstitution(BaseModel):
    constitution: Constitution
    ref: ConstitutionRef


MAX_DEPTH = 24  # a constitution is 6 levels deep (principles[0].examples[0].prompt)
_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep — a constitution is a flat list of principles"


class _NotPlain(yaml.MarkedYAMLError):
    """An alias, too deep nesting or invalid Unicode: refused on purpose, not a syntax error."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (`*name`: a few hundred bytes of nested aliases expand to
    billions of nodes) and nesting deeper than MAX_DEPTH (the composer recurses per level)."""

    def fetch_flow_collection_start(self, TokenClass):  # `[[[[...`: refused while scanning, before parsing
        if self.flow_level >= MAX_DEPTH:
            raise _NotPlain(None, None, _TOO_DEEP, self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _NotPlain(None, None, "aliases (*name) are not allowed in a constitution — "
                                        "write the text out in full", self.peek_event().start_mark)
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > MAX_DEPTH:
                raise _NotPlain(None, None, _TOO_DEEP, self.peek_event().start_mark)
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if isinstance(node, yaml.ScalarNode):  # "\ud800" escapes: a lone surrogate no file or hash can encode
            try:
                check_unicode(node.value)
            except ValueError as exc:
                raise _NotPlain(None, None, str(exc), node.start_mark) from None
        return node


def _compose(text: str, file: str) -> tuple[yaml.Node | None, Any]:
    """Parse YAML into (node tree, plain data), safe constructors only, no aliases, bounded depth."""
    loader = _PlainLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except _NotPlain as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConstitutionError(file, line, None, f"invalid YAML: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = " ".join(part for part in (exc.context, exc.problem) if part)
        last_line = max(1, len(text.rstrip("\n").splitlines()))
        line = min(mark.line + 1, last_line) if mark else None
        raise ConstitutionError(file, line, None, f"invalid YAML: {detail} — fix the syntax here (indentation, quoting, colons)")
    except yaml.YAMLError as exc:
        raise ConstitutionError(file, None, None, f"invalid YAML: {exc} — fix the syntax")
    finally:
        loader.dispose()
    return root, data


def _duplicate_keys(node: yaml.Node | None, loc: tuple, file: str) -> list[ConstitutionError]:
    """YAML silently keeps the last of two equal keys; report them instead."""
    errors: list[ConstitutionError] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    errors.append(ConstitutionError(
                        file, key.start_mark.line + 1, _field_path(loc + (key.value,)),
                        "duplicate key — YAML keeps only the last one; remove or merge the duplicates",
                    ))
                seen.add(key.value)
                errors += _duplicate_keys(value, loc + (key.value,), file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            errors += _duplicate_keys(item, loc + (index,), file)
    return errors


# --- error mapping

_HINTS = {
    "name": "use a short slug such as 'harmless'",
    "version": 'write a semantic version in quotes, e.g. version: "1.0.0"',
    "description": "say in one sentence what this constitution is for",
    "principles": "list at least one principle under 'principles:'",
    "id": "use a slug such as 'no-violence' (lowercase letters, digits, hyphens)",
    "critique_request": "write the request the model should critique against",
    "revision_request": "write how the model should rewrite its answer",
    "comparison_question": "write a two-choice question such as 'Which of these responses is less harmful?'",
    "tags": "give a list of short labels, e.g. [harm, violence]",
    "directions": "give a mapping with `toward` and `away`, the two steering instructions for contrastive pairs",
    "toward": "write the instruction that steers an answer toward the principle",
    "away": "write the instruction that steers an answer away from the principle (the opposite behaviour)",
    "examples": "give a list of mappings with prompt, answer, critique and revision",
    **{f: f"write the example's {f} text" for f in ("prompt", "answer", "critique", "revision")},
}
_ITEM_HINTS = {
    "principles": "each principle is a mapping with id, critique_request, revision_request, comparison_question",
    "examples": "each example is a mapping with prompt, answer, critique, revision",
    "tags": "each tag is a short non-empty label",
}
_MODEL_AT = {None: Constitution, "principles": Principle, "examples": FewShotExample, "directions": Directions}


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """Line of the deepest YAML node on the `loc` path (a missing key points at its parent)."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _message(err: dict, loc: tuple) -> str:
    kind, names = err["type"], [p for p in loc if isinstance(p, str)]
    field = names[-1] if names else None
    hint = _ITEM_HINTS.get(field, "") if loc and isinstance(loc[-1], int) else _HINTS.get(field, "")
    given = err.get("input")
    if kind == "same_directions":
        return err["msg"]
    if kind == "missing":
        return f"required field is missing — add it: {hint}"
    if kind == "extra_forbidden":
        owner = names[-2] if len(names) > 1 else None
        allowed = ", ".join(_MODEL_AT.get(owner, Constitution).model_fields)
        return f"unknown key — remove it or fix the spelling (allowed keys: {allowed})"
    if kind in ("string_too_short", "too_short", "no_principles"):
        return f"must not be empty — {hint}"
    if kind == "string_type":
        return f"expected text, got {type(given).__name__} {given!r} — {hint}"
    if kind == "string_pattern_mismatch":
        what = "a semantic version MAJOR.MINOR.PATCH" if field == "version" else "a slug"
        return f"{given!r} is not {what} — {hint}"
    if kind == "list_type":
        return f"expected a list, got {type(given).__name__} — {hint}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {type(given).__name__} — {hint}"
    return f"{err['msg']} — {hint}" if hint else err["msg"]


def _pydantic_errors(exc: ValidationError, root: yaml.Node | None, file: str) -> list[ConstitutionError]:
    errors = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "duplicate_id":
            continue  # reported with its exact line by _duplicate_ids
        errors.append(ConstitutionError(file, _line_of(root, loc), _field_path(loc) or None, _message(err, loc)))
    return errors


def _duplicate_ids(data: dict, root: yaml.Node | None, file: str) -> list[ConstitutionError]:
    """Repeated principle ids, found on the raw data so they show even beside other errors."""
    principles = data.get("principles")
    if not isinstance(principles, list):
        return []
    ids = [p["id"].strip() if isinstance(p, dict) and isinstance(p.get("id"), str) else object() for p in principles]
    return [
        ConstitutionError(file, _line_of(root, ("principles", index, "id")), f"principles[{index}].id",
                          _duplicate_message(pid, first))
        for index, pid, first in _duplicates(ids)
    ]


def _parse(text: str, file: str) -> tuple[Constitution | None, list[ConstitutionError], yaml.Node | None]:
    """Validate YAML text; returns the model (if valid), every error found, and the node tree."""
    try:
        root, data = _compose(text, file)
    except ConstitutionError as exc:
        return None, [exc], None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        message = f"expected a mapping with name, version, description, principles; got {got} — see constitutions/harmless.yaml"
        return None, [ConstitutionError(file, _line_of(root, ()), None, message)], root
    errors = _duplicate_keys(root, (), file) + _duplicate_ids(data, root, file)
    try:
        constitution = Constitution.model_validate(data)
    except ValidationError as exc:
        constitution, errors = None, errors + _pydantic_errors(exc, root, file)
    errors.sort(key=lambda e: (e.line or 0))
    return (None if errors else constitution), errors, root


# --- public API

def load_constitution(spec: str | Path) -> LoadedConstitution:
    """Load a constitution from a path or `path@REV`; raises the first ConstitutionError found.
    `ref.path` names the file by display_path (a `path@REV` spec: as given)."""
    file, text, commit = read_source(spec)
    constitution, errors, _ = _parse(text, file)
    if errors:
        raise errors[0]
    assert constitution is not None
    ref = ConstitutionRef(name=constitution.name, version=constitution.version,
                          sha256=constitution.content_sha256(), git_commit=commit, path=_shown(spec, file))
    return LoadedConstitution(constitution=constitution, ref=ref)


def _shown(spec: str | Path, file: str) -> str:
    path, rev = split_spec(spec)
    return file if rev is not None else display_path(path)


def _bump_error(path: Path, current: Constitution, root: yaml.Node | None, file: str) -> ConstitutionError | None:
    """Error when the content differs from git HEAD but the version was not raised."""
    location = git_location(path)
    if location is None:
        return None
    top, rel = location
    head_text = git(top, "show", f"HEAD:{rel}")
    if head_text is None:
        return None  # untracked, new, or no commits yet
    head, _, _ = _parse(head_text, f"{file}@HEAD")
    if head is None or head.content_sha256() == current.content_sha256() or current.version_tuple > head.version_tuple:
        return None
    major, minor, _ = head.version_tuple
    return ConstitutionError(
        file, _line_of(root, ("version",)), "version",
        f"content changed since HEAD (version {head.version}) but version is {current.version}"
        f" — bump it, e.g. to \"{major}.{minor + 1}.0\"",
    )


def validate_constitution(path: str | Path) -> list[ConstitutionError]:
    """Every problem in one file (empty list when valid), including a missing version bump vs git HEAD."""
    try:
        file, text, _ = read_source(path)
    except ConstitutionError as exc:
        return [exc]
    constitution, errors, root = _parse(text, file)
    if errors or constitution is None:
        return errors
    file_path, rev = split_spec(path)
    if rev is None:
        bump = _bump_error(file_path, constitution, root, file)
        if bump is not None:
            return [bump]
    return []


def sample_principle(constitution: Constitution | LoadedConstitution, seed: int, *keys: object) -> Principle:
    """Pick a principle uniformly, determined only by (seed, keys) — not by call order or hash seed."""
    if isinstance(constitution, LoadedConstitution):
        constitution = constitution.constitution
    payload = json.dumps([seed, *keys], sort_keys=True, ensure_ascii=False, default=str)
    rng = random.Random(int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "big"))
    return rng.choice(constitution.principles)


# --- diff
