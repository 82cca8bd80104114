"""Where FewStepScheduler lived before the package was grouped by stage; it now lives in ``fewstep.export``.

Student folders exported before the move name ``["fewstep.scheduling_fewstep", "FewStepScheduler"]`` in their
model_index.json, and diffusers looks that library up in ``sys.modules``: importing this module (``load_pipeline``
does) keeps those folders loading.
"""

from .export.scheduling_fewstep import FewStepScheduler

__all__ = ["FewStepScheduler"]
