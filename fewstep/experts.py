"""Where TimestepExperts lived before the package was grouped by stage; it now lives in ``fewstep.export``.

Phased DMD students exported before the move name ``["fewstep.experts", "TimestepExperts"]`` in their
model_index.json, and diffusers looks that library up in ``sys.modules``: importing this module (``load_pipeline``
does) keeps those folders loading.
"""

from .export.experts import TimestepExperts

__all__ = ["TimestepExperts"]
