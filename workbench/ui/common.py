"""Transitional re-export of the old shared UI module; the pieces live in ``session.py``, ``task.py``,
``widgets.py`` and ``text.py`` (import from there). Removed once its last importers are updated."""
from .session import (QUEUE_KEY, RUN_COLUMNS, DataStore, UserStore, dataset_from_spec, job_queue,  # noqa: F401
                      open_run, session_id, session_user)
from .task import BUSY, BackgroundTask, TaskContext  # noqa: F401
from .text import code_block, escape_html, escape_md, html_labels, short_spec, text_block  # noqa: F401
from .widgets import (CHOICES, UPLOAD_ENV, ErrorBox, TextUpload, allowed_values, config_widgets,  # noqa: F401
                      run_options, values_from_widgets)
