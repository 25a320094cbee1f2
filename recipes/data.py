"""Offline text shipped with every Python: data for the recipes, deterministic for a given seed.

* General text: Python's own documentation topics (`pydoc_data.topics`, ~465k characters), split by topic into
  a calibration part and a held-out part the model is checked on.
* A classification task from a different source: which standard-library package a docstring comes from.
* A harder 12-class version over installed libraries (`library_docstring_task`), large enough for a test set of
  >= 500 items: which of numpy, scipy, pandas, ... a docstring comes from.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import random

TASK_PACKAGES = ("asyncio", "email", "xml", "logging", "http", "importlib")
# 12 libraries every `make test` environment has (direct or transitive dependencies of the dev extra), each with
# >= 250 docstrings of >= 80 characters in the versions measured here (the smallest: jinja2 259).
LIBRARY_PACKAGES = ("numpy", "scipy", "pandas", "sklearn", "networkx", "huggingface_hub", "datasets", "accelerate",
                    "peft", "trl", "jinja2", "PIL")


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


def _package_version(package: str) -> str:
    from importlib import metadata

    dist = {"sklearn": "scikit-learn", "PIL": "pillow"}.get(package, package)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def library_docstrings(packages=LIBRARY_PACKAGES, cache_dir: str = "runs/cache") -> dict[str, list[str]]:
    """{package: sorted docstrings}, collected in a child process (importing every submodule of scipy or sklearn
    prints, warns and registers things; none of it should reach the caller) and cached per package version."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    versions = {p: _package_version(p) for p in packages}
    missing = [p for p, v in versions.items() if v == "missing"]
    if missing:
        raise SystemExit(f"library_docstrings: packages {missing} are not installed; run `make test`'s set-up "
                         "(./scripts/bootstrap.sh dev) or pass packages that are")
    key = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"library_docstrings-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "docs.json")
        code = (f"import json, sys, warnings; sys.path.insert(0, {here!r}); warnings.simplefilter('ignore'); "
                f"import data; json.dump({{p: data._docstrings(p) for p in {list(packages)!r}}}, open({out!r}, 'w'))")
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        with open(out) as f:
            docs = json.load(f)
    from peft_ext.files import atomic_file

    os.makedirs(cache_dir, exist_ok=True)
    with atomic_file(path) as tmp_path, open(tmp_path, "w") as f:
        json.dump(docs, f)
    return docs


def library_docstring_task(seed: int = 0, n_train: int = 88, n_val: int = 24, n_test: int = 48,
                           packages=LIBRARY_PACKAGES, cache_dir: str = "runs/cache"):
    """(train, val, test, label_names): lists of (text, label), which library a docstring comes from.

    Per class `n_test` test, `n_val` validation and `n_train` training docstrings, disjoint. The test and validation
    docstrings depend only on the installed versions (drawn with seed 0), so every seed of an experiment is judged
    on the same items; `seed` only reshuffles which of the remaining docstrings train and in what order."""
    docs = library_docstrings(packages, cache_dir)
    train, val, test = [], [], []
    for label, package in enumerate(packages):
        pool = list(docs[package])
        short = n_train + n_val + n_test - len(pool)
        if short > 0:
            raise SystemExit(f"library_docstring_task: {package} has {len(pool)} docstrings, {short} too few for "
                             f"n_train={n_train}, n_val={n_val}, n_test={n_test}; lower them")
        random.Random(0).shuffle(pool)
        test += [(d, label) for d in pool[:n_test]]
        val += [(d, label) for d in pool[n_test : n_test + n_val]]
        rest = pool[n_test + n_val :]
        random.Random(seed).shuffle(rest)
        train += [(d, label) for d in rest[:n_train]]
    random.Random(seed).shuffle(train)
    return train, val, test, list(packages)


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
