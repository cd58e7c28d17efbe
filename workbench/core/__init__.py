"""Layer 1, the core: argument checks, datasets, the model families, training and the progress protocol.

Nothing here imports anything above it (``tests/test_import_graph.py``).
"""
