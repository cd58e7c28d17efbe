"""Serving: the job queue (threads or Dask), sweeps on it, classroom mode.
"""
