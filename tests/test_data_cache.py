"""The tokenization cache's entry writer (data/pipeline.py, through core.atomic's atomic_folder): the marker
file is written last and the folder renamed into place, so an entry is either finished or never read."""
import json
import logging

import datasets
import pytest

from ftctl.data import pipeline


@pytest.fixture
def table():
    return datasets.Dataset.from_dict({"idx": [0, 1], "status": ["ok", "bad"]})


def test_an_entry_is_written_whole_with_its_marker_and_no_temporary_left(tmp_path, table):
    folder = tmp_path / "data" / "abc"
    pipeline._save(table, folder, {"version": "x"})
    assert json.loads((folder / pipeline.CACHE_DONE).read_text()) == {"version": "x"}
    assert pipeline._load_cached(folder)["status"] == ["ok", "bad"]
    assert [p.name for p in folder.parent.iterdir()] == ["abc"]


def test_an_unfinished_entry_is_not_read_and_is_replaced(tmp_path, table):
    folder = tmp_path / "abc"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"half")  # a crash before the marker
    assert pipeline._load_cached(folder) is None
    pipeline._save(table, folder, {"version": "x"})
    assert pipeline._load_cached(folder)["idx"] == [0, 1]


def test_a_finished_entry_written_meanwhile_is_kept(tmp_path, table):
    folder = tmp_path / "abc"
    pipeline._save(table, folder, {"by": "the other process"})
    pipeline._save(datasets.Dataset.from_dict({"idx": [7]}), folder, {"by": "this one"})
    assert json.loads((folder / pipeline.CACHE_DONE).read_text()) == {"by": "the other process"}
    assert pipeline._load_cached(folder)["idx"] == [0, 1]


def test_a_failed_write_is_a_warning_and_leaves_nothing(tmp_path, table, monkeypatch, caplog):
    def full(self, path, **kw):
        (tmp_path / "started.arrow").rename(f"{path}/data-00000-of-00001.arrow")  # the write began, then failed
        raise OSError(28, "No space left on device")

    (tmp_path / "started.arrow").write_bytes(b"half")
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    with caplog.at_level(logging.WARNING, logger="ftctl"):
        pipeline._save(table, tmp_path / "abc", {})
    assert "could not write the data cache" in caplog.text and "No space left" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no entry, no temporary folder
