"""Training rows for qmiss-train, read and checked before any model is loaded.

:func:`load_rows` reads a local file or folder (.jsonl, .json, .csv, .parquet, or a folder written by
``datasets.save_to_disk``) or a datasets hub name, applies ``--dataset_split``, works out which of
two kinds of rows it holds, and checks every row:

- **pairs**: a prompt and a response column (``query``/``response``, TRL's ``prompt``/``completion``,
  or the two named by ``--dataset_field``), both non-empty text;
- **conversations**: a ``messages`` column (OpenAI: ``{"role", "content"}`` turns) or a ShareGPT
  ``conversations`` column (``{"from", "value"}`` turns, ``human``/``gpt``), or the one column
  named by ``--dataset_field``. Each is checked (a list of turns, known roles, non-empty text, at
  least one assistant turn) and made OpenAI-style messages.

A bad file fails with one :class:`~qmiss.inputs.InputError` naming the file, line or row, the field
and what was found there, plus how many rows are bad, instead of a traceback from deep inside
``datasets.map`` after the model has loaded.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import datasets
import pyarrow.parquet as pq

from qmiss.inputs import InputError, check_local_path, few, hub_access

#: file suffixes --data_path reads, and the datasets builder of each.
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: bad rows listed in an error (the rest are counted).
SHOWN = 5
#: pair columns looked for when --dataset_field is not given, in order: qmiss/MetaMathQA's, then TRL's.
PAIR_COLUMNS = (("query", "response"), ("prompt", "completion"))
#: conversation columns looked for when --dataset_field is not given, and the key names of their turns.
CONVERSATION_COLUMNS = {"messages": ("role", "content"), "conversations": ("from", "value")}
#: the roles of a turn, as OpenAI and ShareGPT spell them, and the role the chat template is given.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}

Kind = Literal["pairs", "conversations"]


@dataclass
class Rows:
    """Checked training rows.

    Attributes:
        dataset: a ``datasets.Dataset``: columns ``query``, ``response`` (pairs) or ``messages`` (conversations,
            OpenAI-style, whatever the source's spelling).
        kind: "pairs" or "conversations".
        where: where each row came from, for later errors ("d.jsonl line 7", "row 12").
        source: the file, folder or hub name.
    """

    dataset: Any
    kind: Kind
    where: list[str]
    source: str


@dataclass
class _Records:
    """Rows read from local JSON or CSV files, and where each came from."""

    records: list[dict[str, Any]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # "pairs.jsonl line 7"
    seen_fields: set[str] = field(default_factory=set)


def _add(rows: _Records, record: Any, where: str, path: Path) -> None:
    if not isinstance(record, dict):
        raise InputError(f"--data_path {path}: {where.removeprefix(path.name + ' ')} is a JSON "
                         f"{type(record).__name__}, not an object with the row's fields")
    rows.seen_fields.update(record)
    rows.records.append(record)
    rows.where.append(where)


def _read_json(path: Path, rows: _Records) -> None:
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
                _add(rows, record, f"{path.name} row {i}", path)
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"--data_path {path}: line {lineno}, column {exc.colno}: not valid JSON ({exc.msg}) "
                             "— each line of a .jsonl file is one JSON object") from None
        _add(rows, record, f"{path.name} line {lineno}", path)


def _read_csv(path: Path, rows: _Records) -> None:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows.seen_fields.update(reader.fieldnames or [])
        for record in reader:
            _add(rows, record, f"{path.name} line {reader.line_num}", path)


# --- which kind of rows, and in which columns ------------------------------------------------------------------


def _columns_for(columns: list[str], fields: Optional[tuple[str, ...]], source) -> tuple[Kind, tuple[str, ...]]:
    """The kind of rows and the column(s) holding them.

    Args:
        columns: the data's column names.
        fields: ``--dataset_field``: two names (pairs), one (conversations), or None to look for the usual ones.

    Raises:
        InputError: a named column is missing, or none of the usual ones is there.
    """
    if fields is not None:
        if len(fields) not in (1, 2):
            raise InputError(f"--dataset_field takes QUERY RESPONSE (pairs) or one CONVERSATION column; got "
                             f"{list(fields)}")
        missing = [name for name in fields if name not in columns]
        if missing:
            raise InputError(f"--data_path {source}: no field(s) {missing}; its columns are {list(columns)} — pass "
                             "--dataset_field QUERY RESPONSE (pairs) or --dataset_field COLUMN (conversations)")
        return ("pairs" if len(fields) == 2 else "conversations"), tuple(fields)
    for pair in PAIR_COLUMNS:
        if all(name in columns for name in pair):
            return "pairs", pair
    for name in CONVERSATION_COLUMNS:
        if name in columns:
            return "conversations", (name,)
    raise InputError(f"--data_path {source}: no query/response, prompt/completion, messages or conversations "
                     f"column; its columns are {list(columns)} — pass --dataset_field QUERY RESPONSE (pairs) or "
                     "--dataset_field COLUMN (conversations)")


# --- checking values -------------------------------------------------------------------------------------------


def _describe(value: Any) -> Optional[str]:
    """What is wrong with ``value`` as a text field, or None if it is fine."""
    if value is None:
        return "is missing"
    if isinstance(value, str):
        return None if value.strip() else "is an empty string"
    shown = repr(value) if len(repr(value)) <= 30 else repr(value)[:27] + "..."
    return f"is {type(value).__name__} {shown}, not text"


def _pair_problems(row: dict[str, Any], fields: tuple[str, ...]) -> Optional[str]:
    problems = [f"{name!r} {text}" for name in fields if (text := _describe(row.get(name))) is not None]
    return ", ".join(problems) or None


def _messages(value: Any, name: str) -> tuple[Optional[list[dict[str, str]]], Optional[str]]:
    """A conversation as OpenAI-style messages, or what is wrong with it (naming the turn and key)."""
    if value is None:
        return None, f"{name!r} is missing"
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type(value).__name__
        return None, f"{name!r} is {what}, not a list of turns"
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict):
            return None, f"{name}[{k}] is {type(turn).__name__}, not an object"
        role_key, text_key = ("role", "content") if "role" in turn else ("from", "value")
        role = turn.get(role_key)
        if role not in ROLES:
            known = "system, user, assistant" if role_key == "role" else "system, human, gpt"
            return None, f"{name}[{k}].{role_key} {role!r} is not a role ({known})"
        problem = _describe(turn.get(text_key))
        if problem is not None:
            return None, f"{name}[{k}].{text_key} {problem}"
        turns.append({"role": ROLES[role], "content": turn[text_key]})
    if not any(t["role"] == "assistant" for t in turns):
        return None, f"{name!r} has no assistant turn (nothing to learn)"
    return turns, None


def _check(records: list[dict[str, Any]], kind: Kind, fields: tuple[str, ...], where: list[str], source,
           ) -> dict[str, list[Any]]:
    """The rows' columns as qmiss-train uses them; every row checked, one error listing the first bad ones."""
    columns: dict[str, list[Any]] = {"query": [], "response": []} if kind == "pairs" else {"messages": []}
    bad: list[str] = []
    count = 0
    for i, row in enumerate(records):
        if kind == "pairs":
            problem = _pair_problems(row, fields)
            if problem is None:
                columns["query"].append(row[fields[0]])
                columns["response"].append(row[fields[1]])
        else:
            messages, problem = _messages(row.get(fields[0]), fields[0])
            if problem is None:
                columns["messages"].append(messages)
        if problem is not None:
            count += 1
            if len(bad) < SHOWN:
                bad.append(f"{where[i]}: {problem}")
    if count:
        what = f"lack text in {' / '.join(fields)}" if kind == "pairs" else "are not usable conversations"
        raise InputError(f"--data_path {source}: {count} of {len(records)} rows {what}: "
                         f"{'; '.join(bad)}{'; …' if count > len(bad) else ''} — fix or drop those rows")
    return columns


# --- sources ---------------------------------------------------------------------------------------------------


def _split_rows(split: str, n: int) -> Optional[list[int]]:
    """The rows ``--dataset_split`` (datasets' syntax) selects among ``n`` local rows, which make the one split
    'train'; None for all of them."""
    try:
        spans = datasets.ReadInstruction.from_spec(split).to_absolute({"train": n})
    except (ValueError, AssertionError) as exc:
        raise InputError(f"--dataset_split {split!r}: {exc} — local files make one split, 'train'; use e.g. "
                         "train, train[:1000] or train[:10%]") from None
    rows = [i for span in spans for i in range(span.from_, span.to)]
    return None if rows == list(range(n)) else rows


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
    kinds = {DATA_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        raise InputError(f"--data_path {path}: expected one kind of {sorted(DATA_SUFFIXES)} file(s) or a folder "
                         f"written by datasets' save_to_disk, found {few(p.name for p in files) or 'none'}")
    return files


def _read_local(files: list[Path], fields: Optional[tuple[str, ...]]
                ) -> tuple[list[dict[str, Any]], Optional[list[str]], list[str]]:
    """The records of local files, where each came from (None for parquet: row numbers), and the columns."""
    source = files[0] if len(files) == 1 else files[0].parent
    if DATA_SUFFIXES[files[0].suffix] == "parquet":
        columns = list(dict.fromkeys(name for path in files for name in pq.read_schema(path).names))
        kind, names = _columns_for(columns, fields, source)
        for path in files:  # every file must hold the columns
            _columns_for(pq.read_schema(path).names, names, path)
        table = pq.read_table([str(p) for p in files] if len(files) > 1 else files[0], columns=list(names))
        return table.to_pylist(), None, columns
    rows = _Records()
    for path in files:
        (_read_csv if path.suffix == ".csv" else _read_json)(path, rows)
    return rows.records, rows.where, sorted(rows.seen_fields)


def _load_saved(path: Path, split: str):
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"--data_path {path}: not a readable saved dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split.split("[")[0]
        if name not in loaded:
            raise InputError(f"--dataset_split {split!r}: the saved dataset has splits {list(loaded)}")
        loaded = loaded[name]
        split = "train" + split[len(name):]  # the slice applies to that split's rows
    return loaded, split


def _load_hub(name: str, split: str):
    with hub_access() as online:
        try:
            return datasets.load_dataset(name, split=split)
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


def load_rows(data_path: str, split: str = "train", fields: Optional[tuple[str, ...]] = None) -> Rows:
    """The training rows, each checked, as pairs or conversations.

    Args:
        data_path: a .jsonl/.json/.csv/.parquet file, a folder of one kind of them, a folder written by
            ``datasets``' ``save_to_disk``, or a datasets hub name.
        split: ``--dataset_split`` in datasets' syntax.
        fields: ``--dataset_field``: QUERY RESPONSE, or one conversation column; None looks for
            query/response, prompt/completion, messages, then conversations.

    Raises:
        InputError: a missing path (at once, no hub request), a malformed JSON line (its number), a missing
            column, no rows, rows whose fields are missing, empty or not text, conversations that are not
            lists of turns, with an unknown role, an empty turn or no assistant turn (the first few by file
            and line or row number, and their count), a split that does not parse.
    """
    path = check_local_path(data_path, "--data_path")
    if path is None or _is_saved_dataset(path):
        dataset, split = (_load_hub(data_path, split), "train") if path is None else _load_saved(path, split)
        columns, source = dataset.column_names, data_path
        kind, names = _columns_for(columns, fields, source)
        keep = _split_rows(split, len(dataset)) if path is not None else None
        records = dataset.select_columns(list(names)).to_list()
        where = [f"row {i + 1}" for i in range(len(records))]
    else:
        records, where, columns = _read_local(_local_files(path), fields)
        source = path
        kind, names = _columns_for(columns, fields, source) if records else ("pairs", fields or PAIR_COLUMNS[0])
        where = where or [f"row {i + 1}" for i in range(len(records))]
        keep = _split_rows(split, len(records))
    if keep is not None:
        records, where = [records[i] for i in keep], [where[i] for i in keep]
    if not records:
        raise InputError(f"--data_path {source}: no rows{'' if split == 'train' else f' in {split!r}'} — the "
                         "file is empty or the split selects nothing")
    checked = _check(records, kind, names, where, source)
    return Rows(datasets.Dataset.from_dict(checked), kind, where, str(source))
