"""The bottom floor: error types, geometry helpers, view provenance and the run record."""

from medcl.core.errors import MedclConfigError, MedclDataError, MedclError
from medcl.core.provenance import ViewBatch

__all__ = ["MedclError", "MedclDataError", "MedclConfigError", "ViewBatch"]
