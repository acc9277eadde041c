"""medcl: label-efficient medical imaging.

Contrastive 3D pretraining on unlabelled volumes, few-label segmentation fine-tuning and
multiple-instance learning for whole slides. See ``README.md`` and ``DESIGN.md`` in the repository.
"""

__version__ = "0.1.0"

from medcl.core.errors import MedclConfigError, MedclDataError, MedclError  # noqa: E402

__all__ = ["__version__", "MedclError", "MedclDataError", "MedclConfigError"]
