"""Documents from files: which files a corpus has, and the records in each.

A corpus is a directory (its top-level files with a known suffix, in name
order) or one file:

* ``.txt``: one document per file (pretrain only).
* ``.jsonl``: one record per non-blank line, field ``text`` (pretrain) or
  ``messages`` (chat: a list of ``{role, content}`` strings).
* ``.parquet``: one record per row, column ``text`` or ``messages``.

Every record is checked here, in one place, for both readers: the
in-process one (``read_documents``) and the Ray Data prepare step, which
hands each file's bytes to ``file_records``. A bad record (not UTF-8, not
JSON, a missing field, an empty document, a malformed conversation) comes
out as a ``BadRecord`` naming the file and the record, so the caller can
refuse it in one line or skip and count it (``data.on_bad_record``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from topology.errors import ConfigError

SUFFIXES = (".txt", ".jsonl", ".parquet")
BAD_RECORD_MODES = ("error", "skip")


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot be a document; ``where`` names file and record (``f.jsonl:3``, ``f.parquet row 7``)."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def list_files(path: str | Path, kind: str = "pretrain") -> list[Path]:
    """The corpus files under ``path``, in name order; raises ``ConfigError`` when there are none."""
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"data.path {str(path)!r} does not exist; point it at a directory or file of documents")
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    elif root.suffix in SUFFIXES:
        files = [root]
    else:
        raise ConfigError(f"data.path {str(path)!r}: unknown file type; use .txt, .jsonl or .parquet")
    if kind == "chat":
        files = [f for f in files if f.suffix != ".txt"]
    if not files:
        raise ConfigError(f"data.path {str(path)!r} holds no {kind} documents ({', '.join(SUFFIXES)}"
                          f"{'' if kind == 'pretrain' else ' with messages'})")
    return files


def file_records(name: str, data: bytes, kind: str = "pretrain") -> Iterator[tuple[int, Any]]:
    """``(record number, document or BadRecord)`` for each record of one file's bytes.

    Record numbers are 1-based lines for .jsonl, 1-based rows for .parquet
    and 1 for a .txt file; a document is a string (pretrain) or a message
    list (chat).
    """
    field = "messages" if kind == "chat" else "text"
    if name.endswith(".txt"):
        yield 1, _check(_decode(data, name), kind, name)
    elif name.endswith(".jsonl"):
        for n, raw in enumerate(data.split(b"\n"), 1):
            if raw.strip():
                where = f"{name}:{n}"
                line = _decode(raw, where)
                yield n, line if isinstance(line, BadRecord) else _check(_parse(line, field, where), kind, where)
    elif name.endswith(".parquet"):
        yield from _parquet_records(name, data, field, kind)
    else:
        raise ConfigError(f"data file {name!r}: unknown file type; use .txt, .jsonl or .parquet")


def read_documents(path: str | Path, kind: str = "pretrain", on_bad_record: str = "error") -> list[Any]:
    """Every document under ``path`` in corpus order, read in this process (the small-data path).

    Bad records raise ``ConfigError`` (``on_bad_record='error'``) or are left out (``'skip'``).
    """
    docs = []
    for f in list_files(path, kind):
        for _, doc in file_records(str(f), f.read_bytes(), kind):
            if isinstance(doc, BadRecord):
                if on_bad_record == "error":
                    raise bad_record_error(doc)
                continue
            docs.append(doc)
    if not docs:
        raise ConfigError(f"data.path {str(path)!r} holds no {kind} documents that can be read")
    return docs


def bad_record_error(bad: BadRecord | str, count: int = 1) -> ConfigError:
    more = f" ({count} bad records in all)" if count > 1 else ""
    return ConfigError(f"{bad}{more}; fix the record or set data.on_bad_record: skip to leave such records out")


def _decode(data: bytes, where: str) -> str | BadRecord:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(where, f"not UTF-8 (byte {exc.start})")


def _parse(line: str, field: str, where: str) -> Any:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRecord(where, f"not valid JSON ({exc.msg})")
    if not isinstance(record, dict) or field not in record:
        return BadRecord(where, f"record has no {field!r} field; pretrain data needs 'text', chat data 'messages'")
    return record[field]


def _check(doc: Any, kind: str, where: str) -> Any:
    """The document if it is one, else a ``BadRecord``."""
    if isinstance(doc, BadRecord):
        return doc
    if kind == "chat":
        ok = isinstance(doc, list) and doc and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in doc)
        return doc if ok else BadRecord(where, "messages must be a non-empty list of {role, content} strings")
    if not isinstance(doc, str):
        return BadRecord(where, f"'text' is a {type(doc).__name__}, not a string")
    return doc if doc.strip() else BadRecord(where, "empty document")


def _parquet_records(name: str, data: bytes, field: str, kind: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except pa.ArrowException as exc:
        yield 1, BadRecord(name, f"not a parquet file ({str(exc).splitlines()[0]})")
        return
    if field not in parquet.schema_arrow.names:
        yield 1, BadRecord(name, f"no {field!r} column; pretrain data needs 'text', chat data 'messages'")
        return
    n = 0
    for batch in parquet.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            n += 1
            yield n, _check(value, kind, f"{name} row {n}")
