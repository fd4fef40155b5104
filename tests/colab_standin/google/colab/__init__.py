"""A stand-in for ``google.colab`` that behaves like Colab's for fastsd's notebooks in tests.

Driven by environment variables the test sets:
- ``STANDIN_DRIVE``: the folder ``drive.mount`` makes appear as ``<mountpoint>/MyDrive``
  (fastsd reads ``FASTSD_DRIVE_DIR``, which the test points at the same folder);
- ``STANDIN_UPLOADS``: folder whose files ``files.upload()`` returns (and writes to the cwd, as Colab does);
- ``STANDIN_SECRETS``: JSON object of secrets for ``userdata.get``;
- ``STANDIN_LOG``: a file where each call is appended as a line (so the test can check them).
"""

from . import drive, files, output, userdata  # noqa: F401
