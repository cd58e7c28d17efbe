"""Panel views over the engine: one Viewer per page, a DataStore that owns the runs. No math here.

In a notebook: ``wb.ui.extension()`` once, then ``wb.ui.explore(obj)`` shows the dashboard's own views bound to
the notebook's objects; ``wb.ui.doctor()`` says what the notebook front end needs and what is missing.
"""
from .app import App
from .explorers import explore
from .frontend import doctor, extension

__all__ = ["App", "explore", "doctor", "extension"]
