"""RIHA: report-image hierarchical alignment for chest X-ray report generation.

Importable on its own: nothing here imports riha_node.
"""
from riha_model.errors import RihaModelError

__all__ = ["RihaModelError"]
