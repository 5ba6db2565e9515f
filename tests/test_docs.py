"""Every code block of README.md and docs/*.md runs here.

- ``python``: the blocks of one page run in order in one namespace, in a fresh folder (what a reader
  pasting them into one session gets).
- ``bash``: each command: ``qmiss plan`` runs with ``path/to/...`` replaced by a config it stands for
  (Llama-2-7B, Llama-3-8B); a ``qmiss-train`` command (the reference run, under ``accelerate launch``)
  needs a GPU and the hub, so its flags go through qmiss-train's own parser (types, choices, names) and
  accelerate's; ``scripts/demo.sh`` runs with a short recipe appended (its flags go to qmiss-train);
  ``scripts/test.sh`` is what ``.ci/run`` runs; ``scripts/gpu_check.sh`` runs (without a GPU it exits at once);
  ``scripts/gpu_wheels.sh`` fills a temporary folder (skipped when the package index is unreachable).
- ``json``: each line is a data row ``qmiss-train`` reads.
- ``text``: the layout table names every module of qmiss/ and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from qmiss import cli, data, train
from tests.helpers import free_port, index_unreachable

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: what the placeholders of `qmiss plan --config path/to/...` stand for.
CONFIGS = {
    "path/to/model-or-config.json": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                                num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000),
    "path/to/Llama-3-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                                      rope_theta=500000.0, tie_word_embeddings=False),
}


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def commands(text: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_block_says_what_it_is() -> None:
    kinds = {kind for page in PAGES for kind, _ in blocks(page)}
    assert kinds <= {"python", "bash", "json", "text"}, kinds
    assert sum(len(blocks(page)) for page in PAGES) >= 14


@pytest.mark.parametrize("page", [p for p in PAGES if any(k == "python" for k, _ in blocks(p))], ids=_id)
def test_python_blocks_run(page: Path, tmp_path, monkeypatch, smollm2_dir) -> None:
    monkeypatch.chdir(tmp_path)
    if page.name == "distributed.md":  # a rank of its own: the environment torchrun gives each process
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
    namespace: dict = {"__name__": "__docs__"}
    for kind, code in blocks(page):
        if kind == "python":
            exec(compile(code, f"{page.name} block", "exec"), namespace)  # noqa: S102 — the docs' own code
    if page.name == "README.md":
        assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()
        assert (tmp_path / "out/merged/config.json").is_file() and (tmp_path / "miss-smollm2").is_dir()
    if page.name == "distributed.md":
        assert (tmp_path / "out/adapter_config.json").is_file()
    if page.name == "long-context.md":
        assert namespace["out"].logits is None and torch.isfinite(namespace["out"].loss)


def _config_dirs(tmp_path: Path) -> dict[str, str]:
    dirs = {}
    for placeholder, config in CONFIGS.items():
        folder = tmp_path / placeholder.replace("/", "_").removesuffix(".json")
        config.save_pretrained(folder)
        dirs[placeholder] = str(folder)
    return dirs


def _check_train_flags(argv: list[str]) -> None:
    """qmiss-train's parser reads every flag (names, types, choices); its own dataclasses take the values."""
    namespace, rest = train._parser().parse_known_args(argv)
    assert not rest, f"flags qmiss-train does not know: {rest}"
    values = vars(namespace)
    for cls in (train.ModelArguments, train.DataArguments):
        cls(**{f: values[f] for f in cls.__dataclass_fields__})


BASH = [(page, i, cmd) for page in PAGES for i, (kind, text) in enumerate(blocks(page)) if kind == "bash"
        for cmd in commands(text)]


@pytest.mark.parametrize("page, index, command", BASH, ids=[f"{_id(p)}-{i}-{c[0]}-{c[1] if len(c) > 1 else ''}"
                                                              for p, i, c in BASH])
def test_bash_commands_run(page: Path, index: int, command: list[str], tmp_path, smollm2_dir) -> None:
    if command[:2] == ["qmiss", "plan"]:
        dirs = _config_dirs(tmp_path)
        argv = [dirs.get(a, a) for a in command[2:]]
        assert cli.main(["plan", *argv]) == 0  # each documented card holds its plan
    elif command[0] == "qmiss-train":
        _check_train_flags(command[1:])
    elif command[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        module = command.index("-m")
        launch, rest = launch_command_parser().parse_known_args(command[2:module] + ["script.py"])
        assert launch.multi_gpu and launch.num_processes == 2 and not rest
        assert command[module + 1] == "qmiss.train"
        _check_train_flags(command[module + 2:])
    elif command == ["bash", "scripts/test.sh"]:
        assert "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()  # CI runs it: this test is part of it
    elif command == ["bash", "scripts/demo.sh"]:
        short = ["--max_steps", "2", "--demo_train_size", "16", "--demo_eval_size", "8", "--output_dir",
                 str(tmp_path / "demo")]
        env = {**os.environ, "VIRTUAL_ENV": sys.prefix}  # set up in the environment running the tests
        proc = subprocess.run(["bash", "scripts/demo.sh", *short], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "held-out accuracy" in proc.stdout + proc.stderr
        assert json.loads((tmp_path / "demo/summary.json").read_text())
    elif command == ["bash", "scripts/gpu_wheels.sh"]:
        if reason := index_unreachable():
            pytest.skip(reason)
        proc = subprocess.run([*command, str(tmp_path / "whl")], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert {p.name.split("-")[0] for p in (tmp_path / "whl").glob("*.whl")} >= {"bitsandbytes", "trl", "datasets"}
    elif command == ["bash", "scripts/gpu_check.sh"]:
        if torch.cuda.is_available():
            pytest.skip("on a GPU machine gpu_check.sh runs the GPU suite itself; run it by hand")
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "nothing was checked" in proc.stdout, proc.stdout + proc.stderr
    else:
        pytest.fail(f"{_id(page)}: no test runs {shlex.join(command)!r}; add one here")


@pytest.mark.parametrize("page", [p for p in PAGES if any(k == "json" for k, _ in blocks(p))], ids=_id)
def test_json_rows_are_rows_qmiss_train_reads(page: Path, tmp_path) -> None:
    kinds = []
    for kind, text in blocks(page):
        if kind != "json":
            continue
        for n, line in enumerate(text.splitlines()):
            path = tmp_path / f"row{n}.jsonl"
            path.write_text(line + "\n")
            rows = data.load_rows(str(path))
            assert len(rows.dataset) == 1
            kinds.append(rows.kind)
    assert set(kinds) == {"pairs", "conversations"}, kinds


def test_the_layout_table_names_every_module() -> None:
    (layout,) = [text for kind, text in blocks(ROOT / "docs/development.md") if kind == "text"]
    listed = set(re.findall(r"qmiss/(\w+\.py)", layout))
    on_disk = {p.name for p in (ROOT / "qmiss").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert listed == on_disk


#: the only packages imported inside functions (docs/development.md lists them): optional or slow to import.
LATE_IMPORTS = ("gguf", "trl", "torch.distributed")


def test_imports_sit_at_the_top_but_the_optional_ones() -> None:
    import ast

    late = []
    for path in sorted((ROOT / "qmiss").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    names = ([a.name for a in inner.names] if isinstance(inner, ast.Import)
                             else [inner.module or ""] if isinstance(inner, ast.ImportFrom) else [])
                    late += [f"{path.name}:{inner.lineno} {n}" for n in names
                             if not any(n == p or n.startswith(p + ".") for p in LATE_IMPORTS)]
    assert not late
    layout = (ROOT / "docs/development.md").read_text()
    assert all(f"`{p}`" in layout for p in LATE_IMPORTS)


def test_the_files_docs_and_docstrings_cite_exist() -> None:
    """Every project path and test file named in the README, docs/, or a docstring or comment of qmiss/,
    tests/, benchmarks/ and examples/ exists (what a benchmark writes under benchmarks/results/ aside)."""
    sources = [*PAGES, *ROOT.glob("qmiss/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
               *ROOT.glob("examples/*.py"), *ROOT.glob("scripts/*.sh")]
    cited = set()
    for source in sources:
        text = source.read_text()
        cited |= set(re.findall(r"\b((?:qmiss|tests|benchmarks|examples|scripts|docs)/[\w./-]+\.(?:py|sh|md|txt|toml))",
                                text))
        cited |= {f"tests/{name}" for name in re.findall(r"\b(test_\w+\.py)\b", text)}
    missing = sorted(p for p in cited if not (ROOT / p).exists() and not p.startswith("benchmarks/results/"))
    assert not missing


def test_every_module_is_under_the_import_contracts() -> None:
    """A new module must take a place in the layers and in the forbidden contracts' lists (import-linter
    checks only the modules a contract names)."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    modules = {p.stem for p in (ROOT / "qmiss").glob("*.py")} - {"__init__"}
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    assert {m.strip() for layer in layers for m in layer.split("|")} == modules
    sources = {c["name"]: {s.removeprefix("qmiss.") for s in c["source_modules"]}
               for c in contracts if c["type"] == "forbidden"}
    assert sources["Only qmiss.quant imports bitsandbytes"] == modules - {"quant", "__main__"}
    assert sources["No library module imports the commands"] == modules - {"train", "cli", "__main__"}
