"""Offline text shipped with every Python: data for the recipes, deterministic for a given seed.

* General text: Python's own documentation topics (`pydoc_data.topics`, ~465k characters), split by topic into
  a calibration part and a held-out part the model is checked on.
* A classification task from a different source: which standard-library package a docstring comes from.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import random

TASK_PACKAGES = ("asyncio", "email", "xml", "logging", "http", "importlib")


def _bucket(key: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for `key` (hash(), unlike this, is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
    return int(digest[:8], 16) / 2**32


def general_text(split: str, seed: int = 0, heldout_fraction: float = 0.3, chunk_chars: int = 600) -> list[str]:
    """Python documentation in paragraph chunks of about `chunk_chars` characters.

    `split="calibration"` or `"heldout"`: the split is by topic, so no held-out paragraph shares a topic with a
    calibration paragraph.
    """
    from pydoc_data.topics import topics

    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    chunks = []
    for key, text in sorted(topics.items()):
        if (_bucket(key, seed) < heldout_fraction) != want_heldout:
            continue
        current = ""
        for para in (p.strip() for p in text.split("\n\n")):
            if not para:
                continue
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= chunk_chars:
                chunks.append(current)
                current = ""
        if len(current) >= chunk_chars // 3:
            chunks.append(current)
    return chunks


def _docstrings(package: str, min_chars: int = 80) -> list[str]:
    mod = importlib.import_module(package)
    names = [package]
    if hasattr(mod, "__path__"):
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, package + ".")]
    found: set[str] = set()
    for name in names:
        if "__main__" in name or ".test" in name:  # importing a __main__ runs it
            continue
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - optional platform modules fail in many ways
            continue
        objects = [module] + [v for k, v in vars(module).items() if not k.startswith("_") and getattr(v, "__module__", None) == name]
        for obj in objects:
            members = [obj] + ([v for k, v in vars(obj).items() if not k.startswith("_")] if inspect.isclass(obj) else [])
            for member in members:
                doc = inspect.getdoc(member)
                if doc and len(doc) >= min_chars:
                    found.add(doc)
    return sorted(found)


def docstring_task(seed: int = 0, per_class: int = 80, test_fraction: float = 0.3, packages=TASK_PACKAGES):
    """(train, test, label_names): lists of (text, label) classifying docstrings by their stdlib package."""
    rng = random.Random(seed)
    train, test = [], []
    for label, package in enumerate(packages):
        docs = _docstrings(package)
        rng.shuffle(docs)
        docs = docs[:per_class]
        n_test = max(1, int(len(docs) * test_fraction))
        test += [(d, label) for d in docs[:n_test]]
        train += [(d, label) for d in docs[n_test:]]
    rng.shuffle(train)
    return train, test, list(packages)


# ------------------------------------------------------------------------------------------------ images


def digits(image_size: int = 16, test_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled (bilinear) to `image_size`, standardised with the
    training split's mean and std; returns (x_train, y_train, x_test, y_test), x of shape (n, 1, s, s).

    The train/test split depends only on `split_seed`, so every run of an experiment evaluates on the same images."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]
