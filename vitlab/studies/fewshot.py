"""Few-shot linear evaluation, as in the ViT paper (Section 4.1, "few-shot accuracies"):

    "obtained by solving a regularized least-squares regression problem that maps the
    (frozen) representation of a subset of training images to {-1, 1}^K target vectors.
    This formulation allows us to recover the exact solution in closed form."

Features are the frozen model's pre-logits representation (class token or GAP for a ViT,
the pooled features for the CNNs); for each number of shots k and each seed, k images per
class are drawn from the training set, a ridge regression with an intercept is solved in
closed form, and the arg-max of the K outputs is scored on the validation set. A full
linear probe is the same fit on every training image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError

FEATURES = ("pre_logits", "token", "avg")


# ----------------------------------------------------------------------------- features
def _classifier(model: nn.Module) -> nn.Module | None:
    for attr in ("head", "fc", "classifier"):
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def _features_batch(model: nn.Module, x: torch.Tensor, feature: str) -> torch.Tensor:
    has_tokens = hasattr(model, "forward_features") and hasattr(model, "forward_head")
    if feature in ("token", "avg"):
        if not hasattr(model, "num_prefix_tokens"):
            raise ConfigError(f"feature={feature!r} needs a ViT token sequence; this model has none. "
                              f"Use feature='pre_logits' (the model's own pooled features)")
        tokens = model.forward_features(x)
        if feature == "token":
            if model.num_prefix_tokens < 1:
                raise ConfigError("feature='token' needs a class token, but this ViT uses GAP (no class token); "
                                  "use feature='avg' or 'pre_logits'")
            return tokens[:, 0]
        return tokens[:, model.num_prefix_tokens:].mean(dim=1)
    if has_tokens:
        try:
            return model.forward_head(model.forward_features(x), pre_logits=True)
        except TypeError:  # a forward_head without pre_logits: fall back to the classifier's input
            pass
    clf = _classifier(model)
    if clf is None:
        raise ConfigError(f"cannot find the classifier of {type(model).__name__} to read its input features; "
                          f"give the model a `head` (or forward_head(x, pre_logits=True))")
    grabbed = {}

    def hook(_mod, inputs):
        grabbed["x"] = inputs[0]

    handle = clf.register_forward_pre_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    return grabbed["x"].flatten(1)


@torch.no_grad()
def extract_features(model: nn.Module, images, mean=None, std=None, feature: str = "pre_logits",
                     batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """Frozen features of `images` (uint8 (N, C, H, W) or float already normalised).

    uint8 images are scaled to [0, 1] and normalised with `mean`/`std` (per channel, [0, 1] units),
    as the training pipeline does. Returns float64 (N, F)."""
    if feature not in FEATURES:
        raise ConfigError(f"unknown feature {feature!r}; choose one of: {', '.join(FEATURES)}")
    images = torch.as_tensor(images)
    was_training = model.training
    model.eval().to(device)
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device)
            if x.dtype == torch.uint8:
                x = x.float() / 255.0
                if mean is not None:
                    m = torch.as_tensor(mean, dtype=x.dtype, device=device).reshape(1, -1, 1, 1)
                    s = torch.as_tensor(std, dtype=x.dtype, device=device).reshape(1, -1, 1, 1)
                    x = (x - m) / s
            out.append(_features_batch(model, x.float(), feature).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- closed form
def pm1_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels -> {-1, 1}^K target vectors (+1 at the true class)."""
    y = -np.ones((len(labels), num_classes))
    y[np.arange(len(labels)), labels] = 1.0
    return y


@dataclass
class LinearFit:
    weight: np.ndarray  # (F, K)
    bias: np.ndarray    # (K,)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


def fit_least_squares(x: np.ndarray, y: np.ndarray, l2_reg: float = 1.0) -> LinearFit:
    """Closed-form ridge regression with an unregularised intercept:

        W = argmin ||X W + 1 b - Y||^2 + l2_reg ||W||^2
          = (Xc^T Xc + l2_reg I)^-1 Xc^T Yc        (Xc, Yc centred)
          = Xc^T (Xc Xc^T + l2_reg I)^-1 Yc        (the same, solved in the n x n dual
                                                    when there are fewer examples than features)
        b = mean(Y) - mean(X) W
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise DataError(f"features {x.shape} and targets {y.shape} must be (n, F) and (n, K) with the same n")
    if l2_reg < 0:
        raise ConfigError(f"l2_reg={l2_reg} must be >= 0")
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    n, f = xc.shape
    if n < f:
        gram = xc @ xc.T + l2_reg * np.eye(n)
        w = xc.T @ np.linalg.lstsq(gram, yc, rcond=None)[0] if l2_reg == 0 else xc.T @ np.linalg.solve(gram, yc)
    else:
        gram = xc.T @ xc + l2_reg * np.eye(f)
        w = np.linalg.lstsq(gram, xc.T @ yc, rcond=None)[0] if l2_reg == 0 else np.linalg.solve(gram, xc.T @ yc)
    return LinearFit(w, ym - xm @ w)


def accuracy(fit: LinearFit, x: np.ndarray, labels: np.ndarray) -> float:
    return float((fit.predict(x).argmax(1) == np.asarray(labels)).mean())


def sample_shots(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `shots` examples of every class, drawn without replacement."""
    labels = np.asarray(labels)
    idx = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            raise DataError(f"class {c} has only {len(pool)} training examples, fewer than {shots} shots; "
                            f"use fewer shots or a larger training set")
        idx.append(rng.choice(pool, size=shots, replace=False))
    return np.concatenate(idx)


@dataclass
class FewShotResult:
    shots: int
    accuracies: list[float] = field(default_factory=list)  # one per seed

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    def to_dict(self) -> dict:
        return {"shots": self.shots, "mean_acc": self.mean, "std_acc": self.std, "accuracies": self.accuracies}


def few_shot_eval(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                  shots=(1, 5, 10, 25), seeds=(0, 1, 2), l2_reg: float = 1.0,
                  num_classes: int | None = None) -> list[FewShotResult]:
    """k-shot accuracy on the validation set for every k in `shots`, one fit per seed."""
    train_y = np.asarray(train_y)
    k = int(num_classes or max(train_y.max(), np.asarray(val_y).max()) + 1)
    results = []
    for s in shots:
        if int(s) < 1:
            raise ConfigError(f"shots must be positive integers, got {s}")
        res = FewShotResult(int(s))
        for seed in seeds:
            idx = sample_shots(train_y, int(s), np.random.default_rng([int(seed), int(s)]))
            fit = fit_least_squares(train_x[idx], pm1_targets(train_y[idx], k), l2_reg)
            res.accuracies.append(accuracy(fit, val_x, val_y))
        results.append(res)
    return results


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 l2_reg: float = 1.0, num_classes: int | None = None) -> float:
    """Full linear probe: the same closed-form fit on every training example."""
    k = int(num_classes or max(np.max(train_y), np.max(val_y)) + 1)
    fit = fit_least_squares(train_x, pm1_targets(np.asarray(train_y), k), l2_reg)
    return accuracy(fit, val_x, val_y)


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--shots {text!r} is not a comma-separated list of integers; e.g. --shots 1,5,10,25")
    if not shots or any(s < 1 for s in shots):
        raise ConfigError(f"--shots {text!r} must list positive integers, e.g. --shots 1,5,10,25")
    return shots
