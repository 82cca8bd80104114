"""The embedded video world: the bundled 8x8 digits moving on a small canvas (``data.py``), a WanTransformer3DModel
teacher trained by ``train.py`` and shipped as a ``VideoDigitsPipeline`` folder, and a clip evaluator
(``evaluator.py``) for Frechet distance, class and motion accuracy, frame FID and temporal consistency."""
