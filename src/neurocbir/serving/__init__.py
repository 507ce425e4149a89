"""The query engine: a trained model over a case source (a run's own index or an archive), answering
a scan, a drawn region or a study with a prediction and its evidence; feedback, the demo archive and
DICOM results. Below the web layer (:mod:`neurocbir.app`) and beside the CLI, which both use it."""
