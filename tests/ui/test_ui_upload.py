"""Issue 21, item 8: an upload is refused at the widget, the moment it arrives, not when Train is pressed.

The browser's side is played on the page's Bokeh document: the file's base64 goes onto the document's
model and through Panel's own handling of a client change (``_process_events``), as a websocket
message would. An upload above ``WORKBENCH_MAX_UPLOAD_MB`` (or not UTF-8 text) is dropped at once,
the document keeps no copy of it, the note under the widget says why, and Train refuses to start.
"""
import base64

import pytest
from bokeh.document import Document

from workbench.ui.session import DataStore
from workbench.ui.widgets import TextUpload
from workbench.ui.train import TrainPage


def _send(upload: TextUpload, doc: Document, raw: bytes, filename: str):
    """What the browser does when a file is picked: the model's value, then Panel's sync to the widget."""
    root = upload.__panel__().get_root(doc)
    model = upload.file._models[root.ref["id"]][0]
    encoded = base64.b64encode(raw).decode()
    for prop, value in (("value", encoded), ("filename", filename), ("mime_type", "text/plain")):
        model.set_from_json(prop, value)
    upload.file._process_events({"value": encoded, "filename": filename, "mime_type": "text/plain"})
    return model


@pytest.mark.parametrize("raw, why", [(b"a" * 30_000, "at most 0.01 MB (WORKBENCH_MAX_UPLOAD_MB), got 0.0 MB"),
                                      (b"\xff\xfe\x00binary", "is not UTF-8 text (byte 0)")])
def test_a_refused_upload_is_dropped_at_once_with_the_documents_copy(monkeypatch, raw, why):
    monkeypatch.setenv("WORKBENCH_MAX_UPLOAD_MB", "0.01")
    upload = TextUpload()
    model = _send(upload, Document(), raw, "<b>big</b>.txt")
    assert upload.file.value is None and model.value == ""             # nothing kept, here or on the document
    assert why in upload.refused and "Refused" in upload.note.object
    assert "<b>" not in upload.note.object                              # the file's name shown escaped
    with pytest.raises(ValueError, match="text file"):
        upload.text()                                                   # Train refuses, no built-in fallback


def test_a_good_upload_is_kept_and_a_new_one_replaces_a_refusal(monkeypatch):
    monkeypatch.setenv("WORKBENCH_MAX_UPLOAD_MB", "0.01")
    upload, doc = TextUpload(), Document()
    _send(upload, doc, b"\xff", "x.bin")
    assert upload.refused
    model = _send(upload, doc, "the cat sees the moon".encode(), "mine.txt")
    assert upload.text() == "the cat sees the moon" and upload.refused == "" and model.value
    assert "Refused" not in upload.note.object


def test_train_refuses_after_a_dropped_upload_and_starts_nothing(store, monkeypatch):
    monkeypatch.setenv("WORKBENCH_MAX_UPLOAD_MB", "0.01")
    page = TrainPage(DataStore(store))
    page.dataset.value = "text"
    _send(page.upload, Document(), b"x" * 30_000, "big.txt")
    page.start(wait=True)
    assert "at most 0.01 MB" in page.errors.text and page.task.status == "idle" and len(store.list()) == 0
