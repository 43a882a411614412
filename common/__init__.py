"""Code shared by the producer, the toolchain and the report: image decoding, Dice, CLI error handling.

Imports nothing from the other segqueue packages except `engines.base.EngineError` (in `common.cli`).
"""
