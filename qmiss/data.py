"""Training pairs for qmiss-train, read and checked before any model is loaded.

:func:`load_pairs` reads a local file or folder (.jsonl, .json, .csv, .parquet) or a datasets hub
name, applies ``--dataset_split``, and checks that every row holds both fields as non-empty text.
A bad file fails with one :class:`~qmiss.inputs.InputError` naming the file, line or row, the field
and what was found there, plus how many rows are bad, instead of a traceback from deep inside
``datasets.map`` after the model has loaded.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from qmiss.inputs import InputError, check_local_path, few, hub_access

#: file suffixes --data_path reads, and the datasets builder of each.
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: bad rows listed in an error (the rest are counted).
SHOWN = 5


@dataclass
class _Rows:
    """Rows read from local files: each field's values, and where each row came from (for messages)."""

    columns: dict[str, list[Any]]
    where: list[str] = field(default_factory=list)  # "pairs.jsonl line 7"
    seen_fields: set[str] = field(default_factory=set)


def _describe(value: Any) -> Optional[str]:
    """What is wrong with ``value`` as a text field, or None if it is fine."""
    if value is None:
        return "is missing"
    if isinstance(value, str):
        return None if value.strip() else "is an empty string"
    shown = repr(value) if len(repr(value)) <= 30 else repr(value)[:27] + "..."
    return f"is {type(value).__name__} {shown}, not text"


def _add(rows: _Rows, record: Any, fields: tuple[str, str], where: str, path: Path) -> None:
    if not isinstance(record, dict):
        raise InputError(f"--data_path {path}: {where.removeprefix(path.name + ' ')} is a JSON "
                         f"{type(record).__name__}, not an object with fields {list(fields)}")
    rows.seen_fields.update(record)
    for name in fields:
        rows.columns[name].append(record.get(name))
    rows.where.append(where)


def _read_json(path: Path, rows: _Rows, fields: tuple[str, str]) -> None:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": a .json file holding JSON lines, read below
                raise InputError(f"--data_path {path}: line {exc.lineno}, column {exc.colno}: not valid JSON "
                                 f"({exc.msg})") from None
        else:
            if isinstance(payload, dict):  # {"train": [...]} or columns {"query": [...], "response": [...]}
                lists = [v for v in payload.values() if isinstance(v, list)]
                if len(payload) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
                    payload = lists[0]
                elif lists and len(lists) == len(payload) and len({len(v) for v in lists}) == 1:
                    payload = [dict(zip(payload, values)) for values in zip(*payload.values())]
            if not isinstance(payload, list):
                raise InputError(f"--data_path {path}: expected a list of rows (objects) or JSON lines, "
                                 f"found a JSON {type(payload).__name__}")
            for i, record in enumerate(payload, 1):
                _add(rows, record, fields, f"{path.name} row {i}", path)
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"--data_path {path}: line {lineno}, column {exc.colno}: not valid JSON ({exc.msg}) "
                             "— each line of a .jsonl file is one JSON object") from None
        _add(rows, record, fields, f"{path.name} line {lineno}", path)


def _read_csv(path: Path, rows: _Rows, fields: tuple[str, str]) -> None:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows.seen_fields.update(reader.fieldnames or [])
        for record in reader:
            _add(rows, record, fields, f"{path.name} line {reader.line_num}", path)


def _read_local(files: list[Path], fields: tuple[str, str]) -> tuple[dict[str, list[Any]], Optional[list[str]]]:
    """Each field's values in local files, and where each row came from (None for parquet: row numbers)."""
    source = files[0] if len(files) == 1 else files[0].parent
    if DATA_SUFFIXES[files[0].suffix] == "parquet":
        import pyarrow.parquet as pq

        for path in files:
            _check_columns(pq.read_schema(path).names, fields, path)
        table = pq.read_table([str(p) for p in files] if len(files) > 1 else files[0], columns=list(fields))
        return {name: table.column(name).to_pylist() for name in fields}, None
    rows = _Rows({name: [] for name in fields})
    for path in files:
        (_read_csv if path.suffix == ".csv" else _read_json)(path, rows, fields)
    if rows.where:
        _check_columns(sorted(rows.seen_fields), fields, source)
    return rows.columns, rows.where


def _check_columns(columns: list[str], fields: tuple[str, str], source) -> None:
    missing = [name for name in fields if name not in columns]
    if missing:
        raise InputError(f"--data_path {source}: no field(s) {missing}; its columns are {list(columns)} — pass "
                         "--dataset_field QUERY RESPONSE")


def _check_values(columns: dict[str, list[Any]], fields: tuple[str, str], where: Optional[list[str]],
                  source) -> None:
    """Every row has both fields as non-empty text; else one error listing the first bad rows and the count."""
    n = len(columns[fields[0]])
    bad: list[str] = []
    count = 0
    for i in range(n):
        problems = [f"{name!r} {text}" for name in fields if (text := _describe(columns[name][i])) is not None]
        if problems:
            count += 1
            if len(bad) < SHOWN:
                place = where[i] if where else f"row {i + 1}"
                bad.append(f"{place}: {', '.join(problems)}")
    if count:
        raise InputError(f"--data_path {source}: {count} of {n} rows lack text in {' / '.join(fields)}: "
                         f"{'; '.join(bad)}{'; …' if count > len(bad) else ''} — fix or drop those rows")


def _split_rows(split: str, n: int) -> Optional[list[int]]:
    """The rows ``--dataset_split`` (datasets' syntax) selects among ``n`` local rows, which make the one split
    'train'; None for all of them."""
    import datasets

    try:
        spans = datasets.ReadInstruction.from_spec(split).to_absolute({"train": n})
    except (ValueError, AssertionError) as exc:
        raise InputError(f"--dataset_split {split!r}: {exc} — local files make one split, 'train'; use e.g. "
                         "train, train[:1000] or train[:10%]") from None
    rows = [i for span in spans for i in range(span.from_, span.to)]
    return None if rows == list(range(n)) else rows


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
    kinds = {DATA_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        raise InputError(f"--data_path {path}: expected one kind of {sorted(DATA_SUFFIXES)} file(s), found "
                         f"{few(p.name for p in files) or 'none'}")
    return files


def _load_hub(name: str, split: str, fields: tuple[str, str]):
    import datasets

    with hub_access() as online:
        try:
            dataset = datasets.load_dataset(name, split=split)
        except ValueError as exc:
            message = str(exc).lower()
            if "split" in message or "instruction" in message or split.lower() in message:
                raise InputError(f"--dataset_split {split!r} does not parse or does not exist ({exc}); use e.g. "
                                 "train, train[:1000] or train[:10%]") from None
            raise
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            reach = "" if online else " (the hub cannot be reached: only the local cache was searched)"
            raise InputError(f"--data_path {name}: not a local file or folder, and no dataset of that name could "
                             f"be loaded{reach}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from None
    _check_columns(dataset.column_names, fields, name)
    return dataset.select_columns(list(fields))


def load_pairs(data_path: str, split: str, fields: tuple[str, str]):
    """The training rows as a ``datasets.Dataset`` holding the two fields, each row checked.

    Args:
        data_path: a .jsonl/.json/.csv/.parquet file, a folder of one kind of them, or a datasets hub name.
        split: ``--dataset_split`` in datasets' syntax.
        fields: the query and response field names.

    Raises:
        InputError: a missing path (at once, no hub request), a malformed JSON line (its number), a
            missing field, no rows, rows whose fields are missing, empty or not text (the first few by
            file and line or row number, and their count), a split that does not parse.
    """
    import datasets

    path = check_local_path(data_path, "--data_path")
    if path is None:
        dataset = _load_hub(data_path, split, fields)
        columns, where, source = dataset.to_dict(), None, data_path
    else:
        columns, where = _read_local(_local_files(path), fields)
        keep = _split_rows(split, len(columns[fields[0]]))
        if keep is not None:
            columns = {name: [values[i] for i in keep] for name, values in columns.items()}
            where = [where[i] for i in keep] if where is not None else [f"row {i + 1}" for i in keep]
        dataset, source = None, path
    if not columns[fields[0]]:
        raise InputError(f"--data_path {source}: no rows{'' if split == 'train' else f' in {split!r}'} — the "
                         "file is empty or the split selects nothing")
    _check_values(columns, fields, where, source)
    return dataset if dataset is not None else datasets.Dataset.from_dict(columns)
