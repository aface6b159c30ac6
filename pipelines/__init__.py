"""Offline batch image embedding with SigLIP: embed to Parquet, validate with k-NN, serve on Triton."""

__version__ = "0.2.0"
