"""The CI script's helpers (``.ci/``)."""

import subprocess
from pathlib import Path

DISK_CHECK = Path(__file__).parents[1] / ".ci" / "disk_check"


def test_disk_check_warns_naming_the_folder_only_when_space_is_short(tmp_path):
    short = subprocess.run(
        ["bash", str(DISK_CHECK), str(tmp_path), "1000000"], capture_output=True, text=True
    )
    assert short.returncode == 0
    assert short.stderr.startswith(f"warning: {tmp_path.resolve()} has ")
    assert "MiB free, under the 1000000 GiB the install wants" in short.stderr
    enough = subprocess.run(["bash", str(DISK_CHECK), str(tmp_path), "0"], capture_output=True, text=True)
    assert enough.returncode == 0 and enough.stderr == ""


def test_disk_check_names_its_arguments_when_missing():
    proc = subprocess.run(["bash", str(DISK_CHECK)], capture_output=True, text=True)
    assert proc.returncode != 0 and "usage: .ci/disk_check DIR GIB" in proc.stderr
