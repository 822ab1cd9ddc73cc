"""Every module imports on its own, first, in a fresh interpreter: an import cycle hides from tests
that happen to import its modules in a working order (`sherl-pipe info` once failed only that way)."""

from __future__ import annotations

import pytest

import subprocess
import sys

FIRST_IMPORT_OF_EACH = """
import importlib, pkgutil, sys
import sherl_pipe
names = sorted(m.name for m in pkgutil.walk_packages(sherl_pipe.__path__, "sherl_pipe.")
               if m.name != "sherl_pipe.__main__")  # __main__ runs the CLI
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k == "sherl_pipe" or k.startswith("sherl_pipe.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
print(len(names))
print("\\n".join(failed))
"""


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    proc = subprocess.run([sys.executable, "-c", FIRST_IMPORT_OF_EACH], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, *failed = proc.stdout.strip().splitlines()
    assert int(count) > 40 and failed == []


@pytest.mark.slow
def test_an_extraction_in_this_process_does_not_import_dask_distributed(tmp_path, bert_dir, labeled_csv):
    """extract.workers = 1 runs the blocks here: dask.distributed (about 0.25 s to import) stays
    out of it (the early cluster start once imported it before deciding it was not needed)."""
    import conftest

    p = conftest.write_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "c")
    code = ("import sys\nfrom sherl_pipe.config import load_pipeline\nfrom sherl_pipe.extraction import extract\n"
            f"extract(load_pipeline({str(p)!r}), log=lambda m: None)\nprint('distributed' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_sweep_and_compare_reach_the_engine_by_its_public_names_only():
    """The engine (sherl_pipe/engine/) is the one piece sweep and compare share: compare imported 17
    names from 6 of sweep's modules, two of them private. Outside the engine, the package imports
    `sherl_pipe.engine` (its public names) and never an engine module; compare imports nothing of
    sweep."""
    import ast
    from pathlib import Path

    import sherl_pipe

    root = Path(sherl_pipe.__file__).parent
    wrong = []
    for path in root.rglob("*.py"):
        if path.parent.name == "engine":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                into_engine = name.startswith("sherl_pipe.engine.")
                compare_into_sweep = path.parent.name == "compare" and name.startswith("sherl_pipe.sweep")
                if into_engine or compare_into_sweep:
                    wrong.append(f"{path.relative_to(root)}: {name}")
    assert not wrong, wrong
