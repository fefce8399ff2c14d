"""Digits: infinite-width kernel classifiers against a tuned RBF SVM and a trained MLP.

One fixed stratified 50/50 split of scikit-learn's 8x8 digits (``random_state=0``),
the same inputs for every method: each image centred and scaled to ``x . x / 64 = 1``
(`ntkit.datasets.load_digits`). Prints a Markdown table of test accuracy and wall time
of fit + predict on this machine.

- NTK classifier: `ntkit.sklearn.NTKClassifier` with its defaults (ReLU MLP, 2 hidden
  layers, ``w_std=1.5``, ``b_std=0.1``, ``t=inf``, ``diag_reg=1e-6``): kernel
  regression on centred one-hot targets, the converged infinite ensemble.
- NNGP classifier: the same with ``get="nngp"`` (readout-only training).
- RBF SVC: ``sklearn.svm.SVC`` tuned by ``GridSearchCV`` over ``C`` x ``gamma`` with
  5-fold CV on the training half (the time includes the search).
- MLP: ``sklearn.neural_network.MLPClassifier``, two hidden layers of 512 ReLU units,
  Adam (scikit-learn's defaults: lr 1e-3, L2 1e-4, minibatches of 200), up to 300
  epochs with its default stopping rule, ``random_state=0``; not tuned.

Usage: ``python benchmarks/digits.py``
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC

from ntkit.datasets import load_digits
from ntkit.sklearn import NTKClassifier


def _methods():
    return {
        "NTKClassifier (ReLU MLP, depth 2, t=inf)": lambda: NTKClassifier(),
        "NTKClassifier(get='nngp') (NNGP, same MLP)": lambda: NTKClassifier(get="nngp"),
        "RBF SVC, GridSearchCV 5-fold (C, gamma)": lambda: GridSearchCV(
            SVC(kernel="rbf"),
            {"C": [1, 10, 100, 1000], "gamma": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]}, cv=5),
        "MLPClassifier (512-512 ReLU, Adam)": lambda: MLPClassifier(
            hidden_layer_sizes=(512, 512), max_iter=300, random_state=0),
    }


def main() -> None:
    x, y = load_digits()
    x, y = x.numpy(), y.numpy()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=0)
    rows = []
    for name, make in _methods().items():
        model = make()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, y_train)
        accuracy = float(np.mean(model.predict(x_test) == y_test))
        seconds = time.perf_counter() - start
        note = f" (best {model.best_params_})" if hasattr(model, "best_params_") else ""
        rows.append((name + note, accuracy, seconds))
    print(f"Digits, stratified 50/50 split (random_state=0): {len(y_train)} train, "
          f"{len(y_test)} test\n")
    print("| method | test accuracy | fit + predict (s) |")
    print("|---|---|---|")
    for name, accuracy, seconds in rows:
        print(f"| {name} | {accuracy:.4f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
