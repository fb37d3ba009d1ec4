"""Metrics from on-device sums equal metrics computed example by example, across batches
with a padded last batch."""
import jax.numpy as jnp
import numpy as np

from ptft_jax.tasks import metrics
from ptft_jax.tasks.base import add_sums


def _batches(n, batch, *arrays):
    """Fixed-size batches with the last padded by weight-0 rows (as data.labelled does)."""
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        real = idx < n
        idx = np.where(real, idx, 0)
        yield [a[idx] for a in arrays] + [real.astype(np.float32)]


def test_classification_metrics_match_a_hand_computed_confusion_matrix():
    rng = np.random.default_rng(0)
    n, c = 23, 4
    logits = rng.normal(size=(n, c)).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    total = None
    for lg, lb, w in _batches(n, 8, logits, labels):  # 3 batches, the last with 1 real row
        total = add_sums(total, metrics.classification_sums(jnp.asarray(lg), jnp.asarray(lb),
                                                               jnp.asarray(w), c))
    got = metrics.classification_metrics(total, list("abcd"))
    confusion = np.zeros((c, c), int)
    nll = 0.0
    for x, y in zip(logits, labels):
        confusion[y, int(np.argmax(x))] += 1
        nll += -(x[y] - np.log(np.exp(x).sum()))
    assert got["confusion"] == confusion.tolist()
    np.testing.assert_allclose(got["loss"], nll / n, rtol=1e-5)
    assert got["accuracy"] == np.trace(confusion) / n
    f1s = []
    for k, name in enumerate("abcd"):
        tp = confusion[k, k]
        predicted, actual = confusion[:, k].sum(), confusion[k].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        f1s.append(f)
        np.testing.assert_allclose([got[f"precision/{name}"], got[f"recall/{name}"],
                                    got[f"f1/{name}"]], [p, r, f])
    np.testing.assert_allclose(got["macro_f1"], np.mean(f1s))


def test_regression_metrics_match_numpy():
    rng = np.random.default_rng(1)
    n = 19
    p, t = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    total = None
    for bp, bt, w in _batches(n, 8, p, t):
        total = add_sums(total, metrics.regression_sums(jnp.asarray(bp), jnp.asarray(bt),
                                                           jnp.asarray(w)))
    got = metrics.regression_metrics(total)
    np.testing.assert_allclose(got["mse"], np.mean((p - t) ** 2), rtol=1e-5)
    np.testing.assert_allclose(got["mae"], np.mean(np.abs(p - t)), rtol=1e-5)
    np.testing.assert_allclose(got["pearson"], np.corrcoef(p, t)[0, 1], rtol=1e-4)


def test_multi_label_counts_match_a_loop():
    rng = np.random.default_rng(2)
    n, c = 13, 3
    logits = rng.normal(size=(n, c)).astype(np.float32)
    labels = (rng.random((n, c)) > 0.5).astype(np.float32)
    total = None
    for lg, lb, w in _batches(n, 5, logits, labels):
        total = add_sums(total, metrics.multi_label_sums(jnp.asarray(lg), jnp.asarray(lb),
                                                            jnp.asarray(w)))
    predicted = logits > 0
    np.testing.assert_array_equal(total["true_pos"], (predicted & (labels == 1)).sum(0))
    np.testing.assert_array_equal(total["false_pos"], (predicted & (labels == 0)).sum(0))
    np.testing.assert_array_equal(total["false_neg"], (~predicted & (labels == 1)).sum(0))
    got = metrics.multi_label_metrics(total, ["x", "y", "z"])
    assert got["exact_match"] == np.mean(np.all(predicted == (labels == 1), axis=1))
