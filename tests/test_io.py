"""Stage outputs appear all at once or not at all; temporaries of killed stages do not pile up."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from layerchop.io import atomic_dir, remove_stale_temporaries, staged, tmp_suffix, write_json


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staged_publishes_every_file_or_none(tmp_path):
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    tables.mkdir()
    (tables / "main.md").write_text("old table\n")
    with pytest.raises(RuntimeError, match="figure failed"):
        with staged(tables, figures) as (t, f):
            (t / "main.md").write_text("new table\n")
            (f / "curves.png").write_bytes(b"half a figure")
            raise RuntimeError("figure failed")
    assert (tables / "main.md").read_text() == "old table\n"  # the old set stays whole
    assert list(figures.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "tables"]  # no temporaries left

    with staged(tables, figures) as (t, f):
        (t / "main.md").write_text("new table\n")
        (f / "curves.png").write_bytes(b"figure")
        assert not (figures / "curves.png").exists()  # nothing is published before the block ends
    assert (tables / "main.md").read_text() == "new table\n"
    assert (figures / "curves.png").read_bytes() == b"figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "tables"]


def test_temporaries_of_killed_processes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "model"
    host = socket.gethostname()
    dead = tmp_path / f".model.tmp-{host}-{dead_pid()}-deadbeef"
    live = tmp_path / f".model.tmp-{host}-{os.getpid()}-0badcafe"
    other_host = tmp_path / ".model.tmp-another-node-1-12345678"
    other_name = tmp_path / f".model2.tmp-{host}-{dead_pid()}-feedface"
    for d in (dead, live, other_host, other_name):
        d.mkdir()
        (d / "weights").write_text("partial")
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("complete")
    assert (out / "weights").read_text() == "complete"
    assert not dead.exists()  # left by a killed stage on this host
    assert live.exists() and other_host.exists() and other_name.exists()  # running, another node's, not ours

    stale_file = tmp_path / f".metrics.json.tmp-{host}-{dead_pid()}-00000000"
    stale_file.write_text("{")
    write_json(tmp_path / "metrics.json", {"a": 1})
    assert not stale_file.exists()
    assert remove_stale_temporaries(tmp_path / "metrics.json") == []
    assert tmp_suffix().startswith(f"tmp-{host}-{os.getpid()}-")


def test_figure_stage_failing_after_its_table_leaves_the_old_outputs(tmp_path, monkeypatch):
    """The failure mode of the old code: the new table was written, then the figure failed."""
    import yaml
    from test_report import _metrics

    from layerchop.stages import figure1 as stage

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load(open(repo / "params.yaml"))
    params["report"]["oneshot_rows"] = {"dense": "Dense"}
    params["prune"]["methods"] = []  # no one-shot rows
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "eval" / "dense").mkdir(parents=True)
    m = _metrics(134.5e6, 30, 0, 90.0, 45.0, {"heldout_lastword": (0.5, 0.6)})
    (tmp_path / "eval" / "dense" / "metrics.json").write_text(json.dumps({**m, "nonzero_params": 1e8}))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "oneshot.md").write_text("old\n")

    def broken_figure(rows, stem):
        Path(f"{stem}.png").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(stage, "figure1", broken_figure)
    args = argparse.Namespace(params=str(tmp_path / "params.yaml"), eval=str(tmp_path / "eval"),
                              tables=str(tmp_path / "t"), figures=str(tmp_path / "f"))
    with pytest.raises(OSError, match="disk full"):
        stage.main(args)
    assert (tmp_path / "t" / "oneshot.md").read_text() == "old\n"
    assert not (tmp_path / "t" / "oneshot.tex").exists()
    assert not list((tmp_path / "f").glob("*"))
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name]
