"""HTML reports people look at rather than read: one per scan (``write_subject_report``:
numbers with interval and gap z, the subject against the model's reference set, QC, attention,
model card) and one per cohort run (``write_batch_report``: a sortable subject table, scatter,
Bland-Altman and gap-by-group plots, links to the subjects' reports). Self-contained files
(images as base64 PNG, no remote script or style) from Jinja2 templates in ``Resources/Reports``."""
from __future__ import annotations

__all__ = ["write_subject_report", "write_batch_report"]


def __getattr__(name: str):
    if name == "write_subject_report":
        from .subject import write_subject_report

        return write_subject_report
    if name == "write_batch_report":
        from .cohort_report import write_batch_report

        return write_batch_report
    raise AttributeError(name)
