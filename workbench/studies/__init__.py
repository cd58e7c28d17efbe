"""One-paper studies: shallow unrolling, the TLEG learngene, grokking, scaling-law fits.
"""
