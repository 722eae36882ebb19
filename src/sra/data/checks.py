"""Checks of what a dataset holds: labels in range when it opens, non-finite inputs of a batch.

Labels are checked once per dataset, over the whole label array (two reductions; only a dataset
that fails pays for finding the culprit), so opening stays fast at 1.28 M samples. Sample
values are not scanned at open (42 GB at ImageNet 256): :func:`nonfinite_samples` looks at the
one batch whose training step came out non-finite.

Every dataset of :mod:`sra.data` carries ``labels`` (int (N,)) and ``labels_file`` (where they were
read from), and those with files ``sample_name(i)`` (where sample ``i`` lives), which these
messages name.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from sra.errors import SraError


def _sample(i: int, name_of: Callable[[int], str] | None) -> str:
    return f"sample {i}" + (f" ({name_of(i)})" if name_of is not None else "")


def check_labels(labels: np.ndarray, num_classes: int, where: str, why: str = "",
                 name_of: Callable[[int], str] | None = None) -> None:
    """Refuse labels outside 0..num_classes−1: one line naming ``where`` (the labels' file), the
    first offending value with its sample (and file, via ``name_of``) and the allowed range.

    ``why`` says where ``num_classes`` comes from (e.g. "the header declares 1000 classes").
    Label ``num_classes`` would silently train as the null (unconditional) label of classifier-free
    guidance, larger ones fail deep in the class embedding: both are refused here.
    """
    labels = np.asarray(labels)
    reason = f" ({why})" if why else ""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SraError(f"{where}: labels must be integers of shape (N,), found {labels.dtype} "
                       f"{labels.shape}")
    if int(num_classes) < 1:
        raise SraError(f"{where}: the number of classes must be ≥ 1, found {num_classes}{reason}")
    if labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes):
        return  # the common case: two reductions, no temporary arrays
    bad = (labels < 0) | (labels >= num_classes)
    i = int(np.argmax(bad))
    value = int(labels[i])
    null = f"; {value} would train as the null (unconditional) label" if value == num_classes \
        else ""
    raise SraError(
        f"{where}: label {value} of {_sample(i, name_of)} is outside 0..{num_classes - 1}"
        f"{reason}{null}; {int(bad.sum())} of {labels.size} labels are out of range")


def inferred_classes(labels: np.ndarray, where: str,
                     name_of: Callable[[int], str] | None = None) -> int:
    """The class count of labels whose file declares none (a ``dataset.json``): the largest
    label + 1 (at least 1), after refusing negative labels as :func:`check_labels` does."""
    labels = np.asarray(labels)
    num_classes = max(int(labels.max()) + 1, 1) if labels.size else 1
    check_labels(labels, num_classes, where, f"{num_classes} classes: the largest label + 1",
                 name_of)
    return num_classes


def check_labels_fit(dataset, num_classes: int, imposed_by: str) -> None:
    """Refuse a dataset with a label outside 0..num_classes−1 where ``num_classes`` is imposed by
    something other than the data (``imposed_by``, e.g. "the --init-from checkpoint X")."""
    check_labels(dataset.labels, num_classes, dataset.labels_file,
                 f"{imposed_by} has {num_classes} classes", getattr(dataset, "sample_name", None))


def nonfinite_samples(x: torch.Tensor, indices: Sequence[int]) -> list[int]:
    """The entries of ``indices`` whose rows of the batch ``x`` (B, …) hold NaN or ±inf.

    ``indices[j]`` is the dataset index of ``x[j]`` (``ShardedBatchSampler.indices_at``). Reads
    the result on the host: call it at a log step, on a step already known to be non-finite.
    """
    if len(indices) != len(x):
        raise ValueError(f"{len(indices)} indices for a batch of {len(x)} samples")
    if not (x.is_floating_point() or x.is_complex()):
        return []  # integer data (e.g. uint8 images) cannot hold NaN/inf
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    rows = bad.nonzero().flatten().tolist()  # sync point (at a log step only)
    return [int(indices[j]) for j in rows]


def nonfinite_report(found: Sequence[int], batch_size: int, dataset=None) -> str | None:
    """One line blaming the data for ``found``, the dataset indices of a batch of ``batch_size``
    whose inputs hold NaN/inf (naming the samples and, where the dataset knows, the first one's
    file); None when nothing was found."""
    if not found:
        return None
    found = sorted(found)
    name_of = getattr(dataset, "sample_name", None)
    shown = ", ".join(map(str, found[:5])) + (", …" if len(found) > 5 else "")
    first = f" (first: {name_of(found[0])})" if name_of is not None else ""
    return (f"the data holds NaN/inf: {len(found)} of {batch_size} samples of the batch, dataset "
            f"indices {shown}{first}; fix or drop those samples")
