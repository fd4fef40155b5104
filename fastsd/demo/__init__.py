"""``fastsd demo`` and the tiny random-weight models it runs on.

``tour`` runs the main job end to end through the library's real calls; ``tiny`` and ``tiny_ocr``
build SD1/SD2/SDXL and GLM-OCR models with the real block structure at tiny widths (the test
suite uses them too); ``inputs`` generates the photos and the PDF page the tour feeds in.
Importing this package loads nothing heavy.
"""
