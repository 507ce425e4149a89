"""neurocbir: interpretable, retrieval-based decision support for brain tumor MRI.

One sub-package per stage, each importing only the stages below it:

``data`` (cases, transforms, uploads) < ``models`` (encoders, lesion network, inference, CPU
runtime, similarity maps) < ``retrieval`` (index, stores, archive, ingest, DICOMweb) <
``classify`` (KNN, NIR, calibration) < ``evaluate`` < ``reports`` (report text, grounding,
LLM) < ``training`` (recipes, tuning, calibration fitting) < ``app`` (service, case sources,
HTTP API, web UI) < ``cli``. ``files`` (atomic writes, hashes) serves them all.
"""

__version__ = "0.1.0"
