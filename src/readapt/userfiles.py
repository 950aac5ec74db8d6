"""Reading what a user gives readapt: regular files only, JSON strictly, fields by type.

Every file readapt reads from a user goes through `open_regular`, every JSON document through `parse`
(`load` for a file, `lines` for JSON lines, `members` for a safetensors header), so that each way a file
can be wrong is one line naming the file, by construction. On top of them: `read_jsonl` (records with
required keys: questions, passages, predictions, training text) and `read_texts` (training documents from
JSON lines or plain text).

    not a regular file      a FIFO, device, socket or folder: refused without blocking (a FIFO is opened
                            with O_NONBLOCK, which never waits for a writer); a broken link
    not UTF-8               the byte and its offset
    not strict JSON         syntax (line, column); NaN/Infinity; a number out of float range or too long
                            to convert; nesting too deep (RecursionError); a repeated key in one object;
                            a key that is not valid Unicode (a lone surrogate escape)
    wrong top-level type    a list, string or null where an object is expected
    too large               more than MAX_JSON_BYTES (the same cap safetensors puts on a header)
    wrongly typed fields    `check_fields` with a table {field: (test, "what it must be")}

The rules are RFC 8259's plus "no repeated keys" (the safetensors format requires it; Python's json
would silently keep the last value).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from readapt.errors import ReadaptError

MAX_JSON_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE; the largest real index.json is ~10 MB


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file after following links.

    Checked on the open descriptor (no window between the check and the open): opening uses
    O_NONBLOCK, so a FIFO with no writer is refused at once instead of hanging the reader."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if path.is_symlink():
            raise ReadaptError(f"{path} is a broken link (to {os.readlink(path)}, which does not exist); "
                               f"re-create it or download the file again") from None
        raise ReadaptError(f"{path}: no such file") from None
    except OSError as err:
        raise ReadaptError(f"cannot read {path}: {err.strerror or err}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise ReadaptError(f"{path} is {kind}, not a regular file; readapt reads only regular files here")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# --- strict JSON ---------------------------------------------------------------------------------------


class _Refused(ValueError):
    """JSON that Python's json module would accept but strict JSON does not; the message says why."""


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"the key {repeated!r} appears twice in one object")
    if not all(map(str.isascii, obj)):
        for key in obj:
            _check_key(key)
    return obj


def _check_key(key: str) -> None:
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused(f"the key {key!r} is not valid Unicode (a lone surrogate escape)") from None


def _constant(name: str):
    raise _Refused(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:30]} is out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=_float)
_KINDS = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
          bool: "a boolean", type(None): "null"}


@contextmanager
def _reading(source: str | os.PathLike) -> Iterator[None]:
    """Every way parsing can fail, as one ReadaptError naming `source`."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise ReadaptError(f"{source}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                           f"{err.start}); is it the right file?") from None
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}" if err.lineno > 1 else f"column {err.colno}"
        raise ReadaptError(f"{source}: malformed JSON ({err.msg} at {where}); fix or re-create it") from None
    except RecursionError:
        raise ReadaptError(f"{source}: JSON lists or objects nested too deeply to be read; is it the right "
                           f"file?") from None
    except _Refused as err:
        raise ReadaptError(f"{source}: {err}; fix or re-create it") from None
    except ValueError:  # an integer too long to convert (sys.get_int_max_str_digits)
        raise ReadaptError(f"{source}: a number too long to convert; fix or re-create it") from None


def kind(value: Any) -> str:
    """'an object', 'a list', 'null'...: the JSON kind of a parsed value, for messages."""
    return _KINDS.get(type(value), type(value).__name__)


def parse(text: str | bytes, source: str | os.PathLike, expect: type | None = dict) -> Any:
    """The strict JSON document `text` (bytes: UTF-8) from `source`, whose top level must be an `expect`
    (None: anything)."""
    with _reading(source):
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        value = _DECODER.decode(text)
    if expect is not None and not isinstance(value, expect):
        raise ReadaptError(f"{source}: {kind(value)} where {_KINDS.get(expect, expect.__name__)} is expected; "
                           f"is it the right file?")
    return value


def load(path: str | os.PathLike, expect: type | None = dict, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON file `path` (a regular file of at most `limit` bytes), parsed by `parse`."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ReadaptError(f"{path} is too large to be read as JSON ({size} bytes; the limit is {limit})")
        data = f.read(limit + 1)
    return parse(data, path, expect)


def lines(path: str | os.PathLike, expect: type | None = dict) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of the JSON-lines file `path`, one line in memory at
    a time; each line is parsed by `parse` and named as PATH:LINE in errors."""
    with open_regular(path) as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, parse(raw.rstrip(b"\r\n"), f"{path}:{lineno}", expect)


_SPACE = re.compile(r"[ \t\n\r]*")
_KEY = re.compile(r'[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')  # a key without escapes, and ':'
_NEXT = re.compile(r"[ \t\n\r]*([,}])")


def members(text: str | bytes, source: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """The (key, value) members of the JSON object `text` (bytes: UTF-8), one at a time, each value parsed
    by the same strict rules as `parse`: a large object (a safetensors header) is never held whole as a
    dict. A repeated key is an error."""
    seen: set[str] = set()
    with _reading(source):
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        idx = _SPACE.match(text).end()
        first = text[idx:idx + 1]
        if first != "{":
            top = {"[": "a list", '"': "a string", "n": "null", "t": "a boolean", "f": "a boolean"}
            raise _Refused(f"{top.get(first, 'a number' if first and first in '-0123456789' else 'no JSON')} "
                           f"where an object is expected")
        idx = _SPACE.match(text, idx + 1).end()
        closed = text[idx:idx + 1] == "}"
        idx += closed
        while not closed:
            m = _KEY.match(text, idx)
            if m:
                key, idx = m.group(1), m.end()
            else:  # a key with escapes, or the error to report
                idx = _SPACE.match(text, idx).end()
                if text[idx:idx + 1] != '"':
                    raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, idx)
                key, idx = json.decoder.scanstring(text, idx + 1, True)
                idx = _SPACE.match(text, idx).end()
                if text[idx:idx + 1] != ":":
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, idx)
                idx = _SPACE.match(text, idx + 1).end()
            try:
                value, idx = _DECODER.scan_once(text, idx)
            except StopIteration:
                raise json.JSONDecodeError("Expecting value", text, idx) from None
            if key in seen:
                raise _Refused(f"the key {key!r} appears twice in one object")
            _check_key(key)
            seen.add(key)
            yield key, value
            m = _NEXT.match(text, idx)
            if m is None:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, _SPACE.match(text, idx).end())
            idx, closed = m.end(), m.group(1) == "}"
        end = _SPACE.match(text, idx).end()
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)


@contextmanager
def config_errors(source: str | os.PathLike) -> Iterator[None]:
    """Whatever transformers raises while it builds a config or a model from a user's config.json (a
    field of the wrong type or value: StrictDataclassFieldValidationError, TypeError, AssertionError...)
    as one ReadaptError naming `source`. Wrap only the transformers call, so that readapt's own bugs
    keep their tracebacks."""
    try:
        yield
    except ReadaptError:
        raise
    except Exception as err:  # transformers raises many types for a bad config
        detail = " ".join(str(err).split())
        raise ReadaptError(f"{source}: transformers cannot build the model from it ({type(err).__name__}: "
                           f"{detail[:200]}); fix the config") from None


# --- typed fields --------------------------------------------------------------------------------------

Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE_INT: Check = (lambda v: _is_int(v) and v > 0, "a positive integer")
NON_NEGATIVE_INT: Check = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
NUMBER: Check = (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), "a finite number")
BOOL: Check = (lambda v: isinstance(v, bool), "true or false")
STRING: Check = (lambda v: isinstance(v, str), "a string")
OBJECT: Check = (lambda v: isinstance(v, dict), "an object")
STRINGS: Check = (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings")


def one_of(*allowed: str) -> Check:
    return (lambda v: v in allowed, "one of " + ", ".join(map(repr, allowed)))


def check_fields(obj: Mapping, source: str | os.PathLike, fields: Mapping[str, Check],
                 required: tuple[str, ...] = ()) -> Mapping:
    """Check that each field of `obj` named in `fields` is absent, null or passes its test (`required`
    ones must be present and not null); returns `obj`."""
    for key in required:
        if obj.get(key) is None:
            raise ReadaptError(f"{source} has no {key!r} field; it must be {fields[key][1]}")
    for key, (ok, what) in fields.items():
        value = obj.get(key)
        if value is not None and not ok(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ReadaptError(f"{source}: {key!r} is {shown}; it must be {what}")
    return obj


# --- records and documents ------------------------------------------------------------------------------

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """JSON lines -> list of dicts; a bad line is a ReadaptError naming the file and line number."""
    path = Path(path)
    rows = []
    for lineno, row in lines(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise ReadaptError(f"{path}:{lineno}: missing key(s) {missing}; each line needs {list(required)}")
        if "answers" in required and not (
            isinstance(row["answers"], list) and row["answers"] and all(isinstance(a, str) for a in row["answers"])
        ):
            raise ReadaptError(
                f"{path}:{lineno}: 'answers' must be a non-empty list of strings, got {row['answers']!r}"
            )
        row.setdefault("id", str(lineno))
        row["_line"] = lineno
        rows.append(row)
    if not rows:
        raise ReadaptError(f"{path}: no JSON lines in the file")
    return rows


def check_strings(path, rows: list[dict], key: str) -> None:
    """Refuse a row of `read_jsonl` whose `key` is not a string, naming the file and line."""
    bad = next((r for r in rows if not isinstance(r[key], str)), None)
    if bad is not None:
        raise ReadaptError(f"{path}:{bad['_line']}: {key!r} must be a string, got {bad[key]!r}")


def read_texts(path: str | os.PathLike, what: str = "--data") -> list[str]:
    """The documents of one data file: JSON lines with a string "text" field, or a plain-text file (one
    document). Blank lines and empty texts are skipped; anything else malformed is an error naming the
    file and line (and `what`, the flag that gave it)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ReadaptError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise ReadaptError(f"{what} path {path} is not a file; pass a .jsonl or .txt file")
    suffix = path.suffix.lower()
    docs: list[str] = []
    try:
        if suffix in JSONL_SUFFIXES:
            for rec in read_jsonl(path, required=("text",)):
                if not isinstance(rec["text"], str):
                    raise ReadaptError(f'{path}:{rec["_line"]}: "text" is a {type(rec["text"]).__name__}, '
                                       f'not a string')
                if rec["text"].strip():
                    docs.append(rec["text"])
        elif suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                docs.append(text)
        else:
            raise ReadaptError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; use JSON lines "
                               f'(.jsonl, one {{"text": ...}} per line) or plain text (.txt)')
    except UnicodeDecodeError as err:
        raise ReadaptError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not docs:
        raise ReadaptError(f"{path} contains no text; remove it from {what} or fill it")
    return docs
