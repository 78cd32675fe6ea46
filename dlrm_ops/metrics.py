"""Click-prediction metrics of a set of scores: logloss, accuracy, ROC AUC,
normalized entropy (NE: the logloss over that of always predicting the base
rate; below 1 is better than the base rate, He et al. 2014), and with
``mlperf=True`` the extra ones facebookresearch/dlrm's MLPerf logging prints."""

import math

import numpy as np
import torch
from sklearn import metrics as skm


def scores(probs: torch.Tensor, labels: torch.Tensor, mlperf: bool = False) -> dict:
    p = probs.double().clamp(1e-7, 1 - 1e-7)
    soft = labels.double()  # dlrm's random data has labels in [0, 1): logloss takes them as are
    y = soft.round()
    n = len(y)
    out = {"samples": n}
    if n == 0:
        return out
    logloss = float(torch.nn.functional.binary_cross_entropy(p, soft))
    rate = float(y.mean())
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else math.nan
    both = 0 < rate < 1
    yn, pn = y.numpy(), p.numpy()
    out.update(
        logloss=logloss,
        ne=logloss / base if both else math.nan,
        accuracy=float(((p > 0.5).double() == y).double().mean()),
        auc=float(skm.roc_auc_score(yn, pn)) if both else math.nan,
    )
    if mlperf:
        pred = np.round(pn)
        yi = np.round(yn)
        out.update(
            recall=float(skm.recall_score(yi, pred, zero_division=0)),
            precision=float(skm.precision_score(yi, pred, zero_division=0)),
            f1=float(skm.f1_score(yi, pred, zero_division=0)),
            ap=float(skm.average_precision_score(yi, pn)) if both else math.nan,
        )
    return out


def line(m: dict, digits: int = 5) -> str:
    """One line of the metrics present in ``m``."""
    names = ["logloss", "ne", "accuracy", "auc", "recall", "precision", "f1", "ap"]
    shown = {"ne": "NE", "auc": "AUC", "ap": "AP"}
    return "  ".join(f"{shown.get(k, k)} {m[k]:.{digits}f}" for k in names if k in m)
