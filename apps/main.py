"""Served by `panel serve apps/`: one App (and run store view) per browser session."""
import panel as pn

from workbench.ui import App

pn.extension("plotly", "tabulator", notifications=True)
App().template().servable()
