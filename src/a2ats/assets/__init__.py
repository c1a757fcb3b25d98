"""What the library runs on, offline: named models (assembled from package parts, checked, converted once into
the user cache) in :mod:`.models`, and the texts of calibration, evaluation and the demo in :mod:`.corpus`."""
