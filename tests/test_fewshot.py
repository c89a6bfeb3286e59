"""Few-shot linear evaluation: the closed-form regularised least-squares fit against
independent solvers, the shot sampling, and the frozen features."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from vitlab import ConfigError, DataError, create_model
from vitlab.studies.fewshot import (extract_features, few_shot_eval, fit_least_squares, linear_probe, parse_shots,
                                    pm1_targets, sample_shots)


@pytest.mark.parametrize("n,f", [(200, 16), (10, 64)])  # primal (n > F) and dual (n < F, the few-shot case)
@pytest.mark.parametrize("reg", [0.1, 3.0])
def test_closed_form_equals_independent_least_squares(n, f, reg):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, f)) * rng.uniform(0.5, 2.0, size=f) + rng.normal(size=f)
    labels = rng.integers(0, 5, size=n)
    y = pm1_targets(labels, 5)
    fit = fit_least_squares(x, y, l2_reg=reg)
    # 1) scikit-learn's ridge with an (unpenalised) intercept
    ridge = Ridge(alpha=reg, fit_intercept=True, solver="svd").fit(x, y)
    np.testing.assert_allclose(fit.weight, ridge.coef_.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fit.bias, ridge.intercept_, rtol=1e-7, atol=1e-9)
    # 2) numpy lstsq on the augmented system [X 1; sqrt(reg) I 0] [W; b] = [Y; 0]
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(reg) * np.eye(f), np.zeros((f, 1))]])
    rhs = np.vstack([y, np.zeros((f, 5))])
    sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    np.testing.assert_allclose(fit.weight, sol[:f], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fit.bias, sol[f], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fit.predict(x), a[:n] @ sol, rtol=1e-7, atol=1e-9)


def test_targets_are_plus_minus_one():
    y = pm1_targets(np.array([2, 0]), 3)
    assert y.tolist() == [[-1, -1, 1], [1, -1, -1]]


def test_shot_sampling():
    labels = np.repeat(np.arange(4), 30)
    idx = sample_shots(labels, 5, np.random.default_rng(0))
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert np.bincount(labels[idx]).tolist() == [5, 5, 5, 5]
    other = sample_shots(labels, 5, np.random.default_rng(1))
    assert set(idx.tolist()) != set(other.tolist())
    with pytest.raises(DataError, match="fewer than 31 shots"):
        sample_shots(labels, 31, np.random.default_rng(0))
    assert parse_shots("1,5, 10,25") == [1, 5, 10, 25]
    with pytest.raises(ConfigError):
        parse_shots("1,five")


def test_few_shot_accuracy_grows_with_shots_on_clustered_features():
    rng = np.random.default_rng(0)
    k, f = 6, 20
    centres = rng.normal(size=(k, f)) * 1.2

    def draw(n):
        y = rng.integers(0, k, size=n)
        return centres[y] + rng.normal(size=(n, f)), y

    tx, ty = draw(600)
    vx, vy = draw(600)
    res = few_shot_eval(tx, ty, vx, vy, shots=(1, 25), seeds=(0, 1, 2), l2_reg=1.0)
    assert [r.shots for r in res] == [1, 25]
    assert len(res[0].accuracies) == 3 and len(set(res[0].accuracies)) > 1  # seeds draw different shots
    assert res[0].mean < res[1].mean
    # the nearest-centre (Bayes) accuracy bounds what a linear fit can reach here
    bayes = float((np.argmin(((vx[:, None] - centres[None]) ** 2).sum(-1), 1) == vy).mean())
    full = linear_probe(tx, ty, vx, vy, l2_reg=1.0)
    assert res[1].mean <= bayes + 0.02 and full <= bayes + 0.02
    assert full > 0.8 * bayes


def test_frozen_features_of_a_vit():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    x = (images.float() / 255 - 0.3) / 0.2  # the normalisation extract_features must apply
    model = create_model("vit_nano_p2", num_classes=3, in_chans=1, img_size=8, head="mlp_tanh",
                         representation_size=16)
    with torch.no_grad():
        tokens = model.eval().forward_features(x)
        pre = model.pre_logits(tokens[:, 0])
    np.testing.assert_allclose(extract_features(model, images, [0.3], [0.2], batch_size=2), pre.double().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extract_features(model, images, [0.3], [0.2], feature="avg"),
                               tokens[:, 1:].mean(1).double().numpy(), rtol=1e-5, atol=1e-6)
    gap = create_model("vit_nano_p2", num_classes=3, in_chans=1, img_size=8, global_pool="avg")
    with pytest.raises(ConfigError, match="class token"):
        extract_features(gap, images, [0.3], [0.2], feature="token")


def test_features_of_a_model_without_forward_head_come_from_the_classifier_input():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.ReLU())
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.body(x))

    m = Tiny()
    x = torch.rand(3, 1, 4, 4)
    with torch.no_grad():
        expected = m.body(x).double().numpy()
    np.testing.assert_allclose(extract_features(m, x), expected, rtol=1e-6)


def test_fewshot_command_on_a_trained_checkpoint(tmp_path, capsys):
    import json

    from vitlab.cli import main
    from vitlab.train.config import TrainConfig
    from vitlab.train.engine import fit

    cfg = TrainConfig(model="vit_nano_p2", model_kwargs={"depth": 1}, dataset="digits", epochs=1, batch_size=128,
                      out=str(tmp_path), name="run", progress=False, tensorboard=False)
    fit(cfg, verbose=False)
    out = tmp_path / "fs.json"
    assert main(["fewshot", str(tmp_path / "run"), "--shots", "1,5", "--seeds", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["shots"] for r in res["fewshot"]] == [1, 5] and all(len(r["accuracies"]) == 2 for r in res["fewshot"])
    assert 0.0 <= res["linear_probe_acc"] <= 1.0
    assert "5-shot" in capsys.readouterr().out
    assert main(["fewshot", str(tmp_path / "run"), "--shots", "0"]) == 2  # one-line error, exit 2
