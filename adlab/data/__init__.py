"""Datasets in the MVTec AD layout, the synthetic factory, anomaly synthesis, downloads."""
