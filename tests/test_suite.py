"""The suite's own scheduling: the files conftest sends first exist (a renamed file would silently go last)."""

from conftest import LONGEST_FIRST, REPO


def test_the_files_sent_first_exist():
    missing = [name for name in LONGEST_FIRST if not (REPO / "tests" / name).exists()]
    assert not missing, f"conftest.LONGEST_FIRST names files that do not exist: {missing}"
