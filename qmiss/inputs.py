"""What the user typed, checked before any expensive work: errors that name the flag, paths, the hub.

- :class:`InputError` marks a problem with the user's input (a setting, a path, the data). The
  commands print it as one line and exit with status 2; anything else is a bug and keeps its traceback.
- :func:`spelled_as` makes the settings' error messages use the spelling the user typed: inside
  ``qmiss-train`` ``r`` reads ``--miss_r``, in Python it stays ``r``.
- :func:`check_local_path` fails at once on a path that looks local and does not exist, with no hub
  request; :func:`hub_access` makes a hub look-up quick and quiet when the hub cannot be reached.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse

import datasets.config as datasets_config
import huggingface_hub.constants as hub_constants


class InputError(ValueError):
    """A setting, path or data row the user gave is wrong; the message says which and how to fix it."""


class MissingPathError(InputError, FileNotFoundError):
    """A path the user gave does not exist."""


_SPELLING: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("qmiss_spelling", default={})


def spelled(name: str) -> str:
    """``name`` (a :func:`qmiss.prepare_qmiss` argument) as the user spelled it: ``--miss_r`` in qmiss-train."""
    return _SPELLING.get().get(name, name)


@contextlib.contextmanager
def spelled_as(names: dict[str, str]) -> Iterator[None]:
    """Within the block, error messages name settings by ``names`` (argument → flag), e.g. ``{"r": "--miss_r"}``."""
    token = _SPELLING.set({**_SPELLING.get(), **names})
    try:
        yield
    finally:
        _SPELLING.reset(token)


def few(names: Iterable[str], shown: int = 4) -> str:
    """The first ``shown`` names and a count of the rest: "a, b, c, d and 220 more"."""
    names = list(names)
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown} more"


#: suffixes of files qmiss reads: training data, configs, adapters.
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".gguf", ".bin")
# A hub repository id: "name" or "owner/name" (letters, digits, "-", "_", "."; no leading or trailing "-"/".").
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/)?[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped like a hub id ("gpt2", "meta-llama/Llama-2-7b-hf") rather than a local path."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.lower().endswith(LOCAL_SUFFIXES)


def check_local_path(name: str, what: str) -> Optional[Path]:
    """The local path ``name`` names, or None for a hub id; fails at once, with no hub request, on a missing one.

    Args:
        name: what the user gave.
        what: how to name it in the error, e.g. "--data_path".

    Raises:
        MissingPathError: ``name`` does not exist and is not shaped like a hub id (it has a path
            separator beyond "owner/name", starts with "." "/" or "~", or ends in a file suffix).
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(name):
        return None
    where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
    raise MissingPathError(f"{what} {name}: no such file or folder{where} — check the path; a hub id is 'name' "
                           "or 'owner/name'")


def check_output_dir(name: str, what: str = "--output_dir") -> Path:
    """The folder ``name`` names, if it is one or can be made there; checked before any model is loaded.

    Raises:
        InputError: ``name`` (or a folder it would be made in) is a file, or the nearest existing folder
            is not writable.
    """
    path = Path(name).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise InputError(f"{what} {name}: is a file, not a folder — pass a folder path (it is made if missing)")
    if not existing.is_dir():
        raise InputError(f"{what} {name}: {existing} is a file, so no folder can be made inside it — pass another "
                         "path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {name}: {existing.absolute()} is not writable — pass a folder you can write to")
    return path


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``) answers a TCP connection; False in offline mode."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct connection says nothing about the proxy; leave it to huggingface_hub
    url = urlparse(hub_constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_access() -> Iterator[bool]:
    """Around a hub look-up: where the hub cannot be reached, offline mode for the block (models and datasets
    in the local cache still load; anything else fails at once instead of after retries). Yields reachability."""
    reachable = hub_reachable()
    if reachable:
        yield True
        return
    saved = [(module, "HF_HUB_OFFLINE", module.HF_HUB_OFFLINE) for module in (hub_constants, datasets_config)]
    for module, attr, _ in saved:
        setattr(module, attr, True)
    try:
        yield False
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``QMISS_DEBUG`` set: show tracebacks of input errors."""
    return "--debug" in argv or os.environ.get("QMISS_DEBUG", "") not in ("", "0")


def exit_status(prog: str, argv: list[str], command: Callable[[], int]) -> int:
    """Run a command (``qmiss-train``, ``qmiss plan``): its exit status, or 2 after one line
    ``<prog>: error: <message>`` on stderr for an :class:`InputError` (its traceback with ``--debug``)."""
    try:
        return command()
    except InputError as exc:
        if debug_requested(argv):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def parse_rank_pattern(text: str, flag: str = "--rank_pattern") -> dict[str, int]:
    """A command line's rank override, as a JSON object (``'{"experts": 16}'``) or ``key=r`` pairs separated by
    commas (``experts=16,q_proj=32``), into ``{regex: r}``.

    Raises:
        InputError: neither form, or an r that is not an int; naming ``flag`` and the value.
    """
    text = text.strip()
    example = f"e.g. {flag} experts=16 or {flag} '{{\"experts\": 16}}'"
    if text.startswith("{"):
        try:
            pattern = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{flag} {text!r} is not valid JSON ({exc.msg}); {example}") from exc
        if not isinstance(pattern, dict):
            raise InputError(f"{flag} {text!r} must be a JSON object of regex -> r; {example}")
        return pattern
    pattern = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, rank = pair.rpartition("=")
        if not sep or not key or not rank.strip().isdigit():
            raise InputError(f"{flag} {text!r}: {pair!r} is not key=r with a positive int r; {example}")
        pattern[key.strip()] = int(rank)
    if not pattern:
        raise InputError(f"{flag} is empty; {example}")
    return pattern
