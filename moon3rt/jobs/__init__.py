"""Catalogue jobs: stream rows from JSON lines or Parquet through an Encoder into resumable shards."""

from .job import JobError, JobSummary, run
from .sinks import OutputError, output_for
from .sources import Columns, InputError, Row, input_files, read_rows

__all__ = ["Columns", "InputError", "JobError", "JobSummary", "OutputError", "Row", "input_files", "output_for",
           "read_rows", "run"]
