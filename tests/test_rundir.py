import os

import pytest


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_run_directory_has_the_permissions_of_any_new_folder(umask, fake_run_dir):
    """A group sharing the runs folder reads the run: the folder and its files get the umask's
    permissions, not those of the private temporary folder it was staged in."""
    before = os.umask(umask)
    try:
        path = fake_run_dir()
    finally:
        os.umask(before)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
    files = os.listdir(path)
    assert "scores.npz" in files and "config.json" in files
    assert {name: os.stat(os.path.join(path, name)).st_mode & 0o777 for name in files} == {
        name: 0o666 & ~umask for name in files}
