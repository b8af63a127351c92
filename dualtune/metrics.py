"""The numbers users report: accuracy, precision/recall/F1 (macro and weighted), per-class scores and
the confusion matrix (scikit-learn), and the matrix as text or as a PNG. Framework-free.

Seq2seq models write text, which need not be a label name: such a prediction is wrong for every
class and appears in the confusion matrix as an extra predicted column, ``(other)``.
"""

from __future__ import annotations

from pathlib import Path

OTHER = "(other)"
AVERAGES = (
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def better(metric: str, a: float, b: float) -> bool:
    """Is ``a`` strictly better than ``b`` (eval_loss falls, every other metric rises)?"""
    return a < b if metric == "eval_loss" else a > b


def classification_report(gold: list[str], pred: list[str], label_names: list[str]) -> dict:
    """Scores per class of ``label_names`` (a class absent from ``gold`` and ``pred`` at 0, and left
    out of the averages: ``absent_labels``), as plain JSON."""
    from sklearn import metrics as skm

    names = list(label_names)
    if not gold or len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels and {len(pred)} predictions: need as many, at least one")
    unknown = sorted(set(gold) - set(names))
    if unknown:
        raise ValueError(f"gold labels {unknown[:3]} are not in the label names {names}")
    pred = [p if p in names else OTHER for p in pred]
    columns = names + [OTHER] if OTHER in pred else names
    report = {
        "labels": names,
        "predicted_labels": columns,
        "n": len(gold),
        "accuracy": float(skm.accuracy_score(gold, pred)),
    }
    # The averages run over the classes the eval split has or the model predicted (scikit-learn's
    # own default): a class with neither has no score, and counting it as 0 would cap a perfect
    # model's macro F1 (at 2/3 with one of three classes absent). The absent ones are listed.
    # An (other) prediction is a miss of the gold class, and a false positive of none.
    seen = [n for n in names if n in set(gold) | set(pred)]
    report["absent_labels"] = [n for n in names if n not in seen]
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            gold, pred, labels=seen, average=average, zero_division=0
        )
        report.update(
            {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
        )
    p, r, f, s = skm.precision_recall_fscore_support(gold, pred, labels=names, average=None, zero_division=0)
    report["per_class"] = {
        n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, n in enumerate(names)
    }
    # Rows are gold labels only: no gold label is (other).
    matrix = skm.confusion_matrix(gold, pred, labels=columns)[: len(names)]
    report["confusion_matrix"] = [[int(x) for x in row] for row in matrix]
    return report


def format_classification_report(report: dict) -> str:
    """The per-class table and the confusion matrix, as aligned text."""
    names, columns = report["labels"], report["predicted_labels"]
    w = max(len(n) for n in [*columns, "weighted avg"]) + 2
    out = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for n in names:
        c = report["per_class"][n]
        out.append(f"{n:<{w}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>10}")
    for avg in ("macro", "weighted"):
        out.append(
            f"{avg + ' avg':<{w}}{report['precision_' + avg]:>10.4f}{report['recall_' + avg]:>10.4f}"
            f"{report['f1_' + avg]:>10.4f}{report['n']:>10}"
        )
    cw = max(7, *(len(c) + 2 for c in columns))
    out += [
        "",
        "confusion matrix (rows: gold, columns: predicted)",
        f"{'':<{w}}" + "".join(f"{c:>{cw}}" for c in columns),
    ]
    for n, row in zip(names, report["confusion_matrix"]):
        out.append(f"{n:<{w}}" + "".join(f"{x:>{cw}}" for x in row))
    return "\n".join(out)


def save_confusion_png(report: dict, path: str | Path) -> None:
    """The confusion matrix as an annotated heat map (rows gold, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, columns = report["labels"], report["predicted_labels"]
    matrix = np.asarray(report["confusion_matrix"], dtype=float).reshape(len(names), len(columns))
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 1.0 * len(names) + 1.6))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1.0, matrix.max()))
    for i in range(len(names)):
        for j in range(len(columns)):
            dark = matrix[i, j] > 0.6 * matrix.max()
            ax.text(
                j, i, f"{int(matrix[i, j])}", ha="center", va="center", color="white" if dark else "black"
            )
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"accuracy {report['accuracy']:.4f}, macro F1 {report['f1_macro']:.4f} (n={report['n']})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
