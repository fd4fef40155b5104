"""fastsd: DreamBooth training, model conversion, web UIs and OCR for Colab-class GPUs.

The library is the product; the ``fastsd`` CLI and the notebooks are thin layers over it.
"""

__version__ = "0.1.0"
