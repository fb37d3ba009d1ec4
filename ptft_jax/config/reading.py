"""Files ptft reads, one reader per format: text (UTF-8), YAML, JSON and JSON lines.
core/files.py is the writing counterpart.

Every command reads its users' files through these (a config, a run's config.yaml and
labels.json, a predict input, a sweep space, an experiment config, a bench cases file), so
every unreadable file fails the same way: one UnreadableFile, one line that names the file,
the line (1-based, blank lines counted) and what the file must hold:

    <path>: line N: <what is wrong>; <what was expected / how to fix it>

It sits in the lowest layer (config/) because config/load.py reads the config file with it,
and every layer above may import it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import yaml


class UnreadableFile(ValueError):
    """A file is missing, or is not what it must be (UTF-8 text, YAML, JSON, JSON lines, of
    the right shape). The message is one line naming the file, the line and the fix; the
    command line prints it as it prints any bad input (exit code 2, no traceback)."""


def read_text(path: str | Path, what: str, missing_hint: str = "",
              universal_newlines: bool = True) -> str:
    """The file's text, decoded as UTF-8. `what` names the file's role in the messages ("the
    config file"). Line endings become "\\n" unless `universal_newlines` is False (csv)."""
    text = _decode(_read_bytes(path, what, missing_hint), path, what)
    return text.replace("\r\n", "\n").replace("\r", "\n") if universal_newlines else text


class _SafeUniqueLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping: PyYAML would keep
    the last silently (a second `train:` block dropping the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base constructor names it
                continue
            if seen is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line "
                                f"{seen.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str, expect: type = dict, missing_hint: str = "") -> Any:
    """The file's one YAML document, which must be an `expect` (dict or list); a file with no
    document (empty, or only comments) is an empty one."""
    text = read_text(path, what, missing_hint)
    loader = None
    try:  # what yaml.safe_load does, keeping the node for where the document starts
        loader = _SafeUniqueLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(f"{e.problem or ''}".split()) or " ".join(f"{e.context}".split())
        context = (f" ({e.context} at line {e.context_mark.line + 1})"
                   if e.problem and e.context and e.context_mark is not None else "")
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _error(path, where, f"not valid YAML: {problem}{context}",
                     f"{what} must be YAML (key: value lines, indented with spaces): fix it "
                     f"there") from None
    except yaml.reader.ReaderError as e:  # a control character: it has a position, no mark
        line = text.count("\n", 0, e.position) + 1
        char = chr(e.character) if isinstance(e.character, int) else e.character
        raise _error(path, f"line {line}", f"character {char!r} is not allowed in YAML",
                     f"{what} must be YAML text: remove it") from None
    except yaml.YAMLError as e:
        raise _error(path, "", f"not valid YAML: {' '.join(str(e).split())}",
                     f"{what} must be YAML") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        data = expect()
    if not isinstance(data, expect):
        raise _error(path, f"line {node.start_mark.line + 1}", f"holds {_a(data)} at the top "
                     f"level", f"{what} must hold {_YAML_SHAPES.get(expect, _a(expect()))}")
    return data


def read_json(path: str | Path, what: str, expect: type = dict, missing_hint: str = "") -> Any:
    """The file's one JSON value, which must be an `expect` (dict or list)."""
    text = read_text(path, what, missing_hint)
    if not text.strip():
        raise _error(path, "", "the file is empty", f"{what} must hold {_shape(expect)}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(path, f"line {e.lineno}, column {e.colno}", f"not valid JSON: {e.msg}",
                     f"{what} must be JSON: fix it there (or make it again)") from None
    if not isinstance(data, expect):
        raise _error(path, "line 1", f"holds {_a(data)} at the top level",
                     f"{what} must hold {_shape(expect)}")
    return data


def read_jsonl(path: str | Path, what: str, expect: type = dict,
               missing_hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON lines file, each value an
    `expect`. Line numbers are the file's own, 1-based, blank lines counted; the file is
    read line by line, so any size is fine."""
    _check_file(path, what, missing_hint)
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, what, number, offset + e.start, raw[e.start],
                                e.reason) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\n"))  # an error's column is on this line
            except json.JSONDecodeError as e:
                raise _error(path, f"line {number}, column {e.colno}",
                             f"not valid JSON: {e.msg}", f"each line of {what} must hold "
                             f"{_shape(expect)}: fix or remove that line") from None
            if not isinstance(value, expect):
                raise _error(path, f"line {number}", f"holds {_a(value)}",
                             f"each line of {what} must hold {_shape(expect)}")
            yield number, value


# -- the pieces ------------------------------------------------------------------------------

_YAML_SHAPES = {dict: "a mapping of keys (key: value lines)", list: "a list (- item lines)"}
_JSON_SHAPES = {dict: "a JSON object ({\"key\": value, ...})", list: "a JSON array ([...])"}
_NAMES = {dict: "a mapping", list: "a list", str: "a string", bool: "true / false",
          int: "a number", float: "a number", type(None): "null"}


def _shape(expect) -> str:
    return _JSON_SHAPES.get(expect, "a JSON value")


def _a(value) -> str:
    return _NAMES.get(type(value), type(value).__name__)


def _error(path, where: str, wrong: str, expected: str) -> UnreadableFile:
    head = f"{path}: {where}: " if where else f"{path}: "
    return UnreadableFile(f"{head}{wrong}; {expected}.")


def _check_file(path, what: str, missing_hint: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise _error(path, "", "is a folder", f"{what} must be a file")
    if not path.exists():
        raise _error(path, "", "no such file", f"give an existing file as {what}"
                     + (f" ({missing_hint.strip()})" if missing_hint.strip() else ""))


def _read_bytes(path, what: str, missing_hint: str) -> bytes:
    _check_file(path, what, missing_hint)
    try:
        return Path(path).read_bytes()
    except PermissionError:
        raise _error(path, "", "permission denied", f"make {what} readable "
                     f"(chmod +r)") from None


def _decode(data: bytes, path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _not_utf8(path, what, line, e.start, data[e.start], e.reason) from None


def _not_utf8(path, what: str, line: int, offset: int, byte: int,
              reason: str) -> UnreadableFile:
    name = Path(path).name
    return _error(path, f"line {line}", f"byte 0x{byte:02x} at offset {offset} is not UTF-8 "
                  f"({reason})", f"{what} must be UTF-8 text: convert it, e.g. `iconv -f "
                  f"latin1 -t utf-8 {name} > {name}.utf8`")
