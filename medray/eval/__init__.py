"""Evaluation: LLaVA-Med's VQA metrics (reproduced), a corrected variant, and MCQA accuracy.

    >>> from medray.eval import evaluate, write_report
    >>> report = evaluate("s3://b/runs/vqa-rad/preds", "s3://b/vqa-rad/test.json")  # doctest: +SKIP
    >>> write_report(report, "s3://b/runs/vqa-rad/eval")                           # doctest: +SKIP
"""

from .metrics import (bleu1, corrected_closed_hit, f1_precision_recall, llava_closed_hit, llava_exact_match,
                      mcqa_accuracy, mcqa_choice, normalize, open_recall, vqa_metrics)
from .report import evaluate, read_predictions, write_report

__all__ = ["bleu1", "corrected_closed_hit", "f1_precision_recall", "llava_closed_hit", "llava_exact_match",
           "mcqa_accuracy", "mcqa_choice", "normalize", "open_recall", "vqa_metrics", "evaluate",
           "read_predictions", "write_report"]
