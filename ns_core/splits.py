"""Stratified index splits: the validation split carved from a dataset's training split, and the fixed subsets
`train_limit` / `test_limit` keep, each chosen by a seed and the same on every machine and in every process.
"""

from __future__ import annotations

import hashlib

import numpy as np
from torch import Tensor

from ns_core.utils import cache_dir, save_npz_quietly


def stratified_split(labels: Tensor, size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rest) sorted index arrays: `size` examples stratified by label when every class can be
    represented, else uniformly random; `seed` picks them. None or size >= len keeps everything."""
    labels = labels.cpu().numpy()
    everything = np.arange(len(labels))
    if size is None or size >= len(labels):
        return everything, everything[:0]
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    if classes <= size <= len(labels) - classes and counts[counts > 0].min() >= 2:
        chosen = _stratified_choice(labels, size, seed)
        rest = np.setdiff1d(everything, chosen)
    else:
        order = np.random.default_rng(seed).permutation(len(labels))
        chosen, rest = order[:size], order[size:]
    return np.sort(chosen), np.sort(rest)


def _stratified_choice(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """scikit-learn's stratified `train_test_split`, cached on disk by labels, size, seed and scikit-learn's
    version: importing scikit-learn costs every new process (each Ray trial worker) about a CPU-second."""
    from importlib.metadata import version

    key = hashlib.sha1(labels.tobytes() + f"{labels.dtype}:{size}:{seed}:{version('scikit-learn')}".encode())
    path = cache_dir() / "splits" / f"{key.hexdigest()}.npz"
    try:
        with np.load(path) as saved:
            return saved["chosen"]
    except (OSError, KeyError, ValueError):
        pass  # not cached yet, or unreadable: computed again and rewritten
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    save_npz_quietly(path, chosen=chosen)
    return chosen
