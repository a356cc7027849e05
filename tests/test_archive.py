"""Safe reading of release archives: traversal, escaping links and special files are
refused; the checkpoint is found by scanning; nothing is written outside the target."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from scalr_zoo.archive import UnsafeArchiveError, extract_checkpoint
from scalr_zoo.convert import read_original_checkpoint

from conftest import DATA
from zoo_helpers import make_archive

CHECKPOINT = DATA / "scalr_pretrained.pth"


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 4) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


def write(tmp_path: Path, data: bytes, name: str = "release.tar.gz") -> Path:
    path = tmp_path / "downloads" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_checkpoint_is_found_in_a_nested_tree(tmp_path):
    archive = write(tmp_path, make_archive(CHECKPOINT, extra=[member("WI_test/logs/ok_link", tarfile.SYMTYPE, "config.yaml")]))
    out = extract_checkpoint(archive, tmp_path / "out" / "checkpoint.pth")
    assert out.read_bytes() == CHECKPOINT.read_bytes()
    state = read_original_checkpoint(out)
    assert all(torch.equal(state[k], v) for k, v in read_original_checkpoint(CHECKPOINT).items())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint.pth"]


@pytest.mark.parametrize(
    "bad, why",
    [
        (member("WI_test/../../evil.pth"), "'..' component"),
        (member("../evil.txt"), "'..' component"),
        (member("/etc/evil.pth"), "absolute path"),
        (member("WI_test/link", tarfile.SYMTYPE, "../../../etc/passwd"), "symbolic link .* points outside"),
        (member("WI_test/abs_link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link .* points outside"),
        (member("WI_test/hard", tarfile.LNKTYPE, "../outside.pth"), "hard link .* points outside"),
        (member("WI_test/dev", tarfile.CHRTYPE), "device, FIFO"),
        (member("WI_test/fifo", tarfile.FIFOTYPE), "device, FIFO"),
    ],
)
def test_unsafe_members_refuse_the_whole_archive(tmp_path, bad, why):
    archive = write(tmp_path, make_archive(CHECKPOINT, extra=[bad]))
    with pytest.raises(UnsafeArchiveError, match=why):
        extract_checkpoint(archive, tmp_path / "out" / "checkpoint.pth")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["downloads", "downloads/release.tar.gz"], "nothing was written"


def test_no_checkpoint_or_several_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint.*config.yaml"):
        extract_checkpoint(write(tmp_path, make_archive(None)), tmp_path / "out.pth")
    two = make_archive(CHECKPOINT, extra=[member("WI_test/other/model.pth")])
    with pytest.raises(ValueError, match="several checkpoints.*ckpt_last.pth.*model.pth"):
        extract_checkpoint(write(tmp_path, two, "two.tar.gz"), tmp_path / "out.pth")


def test_damaged_archives_are_clear_errors(tmp_path):
    data = make_archive(CHECKPOINT)
    with pytest.raises(ValueError, match="damaged|not a readable tar"):
        extract_checkpoint(write(tmp_path, data[: len(data) // 2]), tmp_path / "out.pth")
    with pytest.raises(ValueError, match="not a readable tar"):
        extract_checkpoint(write(tmp_path, b"<html>rate limited</html>", "page.tar.gz"), tmp_path / "out.pth")
    with pytest.raises(FileNotFoundError):
        extract_checkpoint(tmp_path / "absent.tar.gz", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
    assert not list(tmp_path.glob("out.pth*.partial"))


def test_uncompressed_tar_is_read_too(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(CHECKPOINT, arcname="deep/er/model.pth")
    out = extract_checkpoint(write(tmp_path, buffer.getvalue(), "plain.tar"), tmp_path / "model.pth")
    assert out.read_bytes() == CHECKPOINT.read_bytes()
