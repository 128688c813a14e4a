"""The pipeline's stages, one module each, all on the contract of `ml.stage`.

Run one with `python -m ml.stages.<module> --config FILE --out DIR` (see `ml.stage.main`).
"""
