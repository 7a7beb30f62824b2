"""Every file we write: atomic replacement, no temp files left, outputs checked before work."""

import json
import os

import pytest
from conftest import assert_user_error, run_cli

from retinanet import files
from retinanet.errors import UserError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d.json"
    files.write_text(str(target), "old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(str(target), "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt  # Ctrl-C in the middle of a write
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["d.json"]


def test_orphaned_temp_files_of_a_killed_write_are_removed(tmp_path):
    target = tmp_path / "m.pth"
    orphans = [tmp_path / ".m.pth.k2j4x.tmp", tmp_path / ".m.pth.a8b1z.tmp"]
    unrelated = [tmp_path / ".other.pth.a8b1z.tmp", tmp_path / "m.pth.notes"]
    for f in orphans + unrelated:
        f.write_text("left by SIGKILL")
    files.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(["m.pth"] + [f.name for f in unrelated])


@pytest.mark.parametrize(
    "name, words",
    [
        ("missing/d.json", ["missing/d.json", "does not exist"]),
        ("folder", ["folder", "is a folder"]),
        ("exists.json", ["exists.json", "exists", "--override"]),
        ("afile/d.json", ["afile/d.json", "does not exist"]),  # a file where the folder should be
    ],
)
def test_check_output_refuses_before_any_work(tmp_path, name, words):
    (tmp_path / "folder").mkdir()
    (tmp_path / "exists.json").write_text("[]")
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError) as e:
        files.check_output(str(tmp_path / name), override=False)
    for w in words:
        assert w in str(e.value)


def test_check_output_probes_the_folder(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # root passes os.access checks: the probe must write
    with pytest.raises(UserError, match="is not writable"):
        files.check_output(str(tmp_path / "d.json"), override=False)


def test_infer_checks_its_output_before_any_work(tmp_path):
    # No model and no images either: the output is the first thing checked, so its error wins.
    proc = run_cli("infer", "nothing.pth", "--output", "no/d.json", cwd=tmp_path, check=False)
    assert_user_error(proc, "no/d.json", "does not exist")
    (tmp_path / "d.json").write_text(json.dumps(["keep"]))
    proc = run_cli("infer", "nothing.pth", "--output", "d.json", cwd=tmp_path, check=False)
    assert_user_error(proc, "d.json", "exists", "--override")
    assert json.loads((tmp_path / "d.json").read_text()) == ["keep"]
