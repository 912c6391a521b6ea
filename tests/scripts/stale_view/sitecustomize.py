"""Test hook: the ranks of the second simulated node see the shared file system late, as an NFS client with
attribute and negative-lookup caches does. Imported as ``sitecustomize`` by every Python process started with
this directory on ``PYTHONPATH`` (tests/test_rehearsal.py, the forked warm start only); it acts only in torchrun workers
of node 1 (``GROUP_RANK=1``) and only when ``LAYERCHOP_TEST_STALE_SECONDS`` is set:

- a path that this process looked up and found missing stays missing for that many seconds (a cached negative
  lookup), whatever another host has written there since;
- a directory listing (``Path.glob``, ``Path.iterdir``) leaves out entries younger than that (a cached listing).

File contents are not touched: ``open`` of a path sees the file (close-to-open consistency), and ``mkdir`` asks
the server, so a directory it finds existing (EEXIST) is seen from then on, as a kernel client revalidates it.
"""

import os

_TTL = float(os.environ.get("LAYERCHOP_TEST_STALE_SECONDS") or 0)

if _TTL > 0 and os.environ.get("GROUP_RANK") == "1":
    import pathlib
    import time

    _missing: dict[str, float] = {}  # path -> when this process last found it missing
    _stat, _iterdir, _glob, _mkdir = pathlib.Path.stat, pathlib.Path.iterdir, pathlib.Path.glob, pathlib.Path.mkdir

    def _stale_stat(self, *, follow_symlinks=True):
        key = os.path.abspath(self)
        seen = _missing.get(key)
        if seen is not None and time.time() - seen < _TTL:
            raise FileNotFoundError(2, "No such file or directory (stale negative lookup)", str(self))
        try:
            return _stat(self, follow_symlinks=follow_symlinks)
        except FileNotFoundError:
            _missing[key] = time.time()
            raise

    def _young(path) -> bool:
        try:
            return time.time() - _stat(path).st_ctime < _TTL
        except OSError:
            return True

    def _stale_iterdir(self):
        return (p for p in _iterdir(self) if not _young(p))

    def _stale_glob(self, pattern):
        return (p for p in _glob(self, pattern) if not _young(p))

    def _revalidating_mkdir(self, *args, **kwargs):
        _missing.pop(os.path.abspath(self), None)
        return _mkdir(self, *args, **kwargs)

    pathlib.Path.mkdir = _revalidating_mkdir
    pathlib.Path.stat = _stale_stat
    pathlib.Path.iterdir = _stale_iterdir
    pathlib.Path.glob = _stale_glob
