"""Models: the encoder factory, the lesion network, a run's files, loading a trained trial for
inference (PyTorch or the OpenVINO CPU runtime) and the similarity maps that explain it."""
