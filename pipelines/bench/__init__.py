"""Benchmarks: `python -m pipelines.bench` (where the embed job's time goes: (a) decode + preprocess, (b) the model
alone, (c) the embed job on generated JPEGs, (d) the Parquet writer) and `python -m pipelines.bench.knn` (the
k-NN backends side by side).
"""

SPLIT = "train"  # the split the generated JPEGs lie in and the measured jobs write
