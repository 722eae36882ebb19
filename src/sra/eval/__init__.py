"""Evaluation: ADM-suite metrics (FID, sFID, Inception Score, precision/recall) and the digits metric.

- :mod:`sra.eval.metrics`: the numbers from feature arrays (numpy/scipy only);
- :mod:`sra.eval.inception`: Inception-v3 features where the ADM suite reads them;
- :mod:`sra.eval.digits`: the project's digit classifier, :func:`~sra.eval.digits.digits_metrics`;
- :mod:`sra.eval.evaluate`: npz in, cached activations, metrics dict / JSON / table out.
"""
