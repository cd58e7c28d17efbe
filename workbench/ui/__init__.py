"""Panel views over the engine: one Viewer per page, a DataStore that owns the runs. No math here."""
from .app import App

__all__ = ["App"]
