"""Datasets: the formats, read and checked; the report of what a job will train on."""
