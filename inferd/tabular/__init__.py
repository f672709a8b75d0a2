"""Tabular and other tensor models served over the Open Inference Protocol (see inferd/server/oip.py)."""
