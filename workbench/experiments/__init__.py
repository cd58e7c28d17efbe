"""The pipelines that pages, sweeps, the bench and notebooks share: each experiment once.
"""
