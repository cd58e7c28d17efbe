"""Pure figure builders: tidy DataFrame (or result object) -> plotly Figure. No torch, no Panel, no I/O."""
