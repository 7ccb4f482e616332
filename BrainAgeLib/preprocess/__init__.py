"""From a T1 volume to the model's sagittal slices: the steps and ``Prepared`` (``pipeline``), brain
extraction (deepbet in ``brain_extraction``, the template method in ``template_strip``,
``registration``, ``template``) and the input's quality control (``qc``)."""
from __future__ import annotations

from .pipeline import Prepared, prepare

__all__ = ["Prepared", "prepare"]
