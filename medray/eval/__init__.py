"""Evaluation: LLaVA-Med's VQA metrics (reproduced), a corrected variant, and MCQA accuracy.

    >>> from medray.eval import evaluate, write_report
    >>> report = evaluate("s3://b/runs/vqa-rad/preds", "s3://b/vqa-rad/test.json")  # doctest: +SKIP
    >>> write_report(report, "s3://b/runs/vqa-rad/eval")                           # doctest: +SKIP

Owns: the metrics and the report. Reads answers through medray.data.shards.
Must not import: medray.infer, medray.train, medray.serve.
"""

from .metrics import (answer_kind, answer_right, answer_words, bleu1, corrected_closed_hit, corrected_scores, llava_closed_hit,
                      llava_exact_match, llava_f1, llava_med_scores, llava_open_hit, mcqa_accuracy, mcqa_choice,
                      normalize, normalize_llava_med, open_hit, open_recall, vqa_metrics, yes_no)
from .report import evaluate, read_candidates, write_report

__all__ = ["answer_kind", "answer_right", "answer_words", "bleu1", "corrected_closed_hit", "corrected_scores", "llava_closed_hit",
           "llava_exact_match", "llava_f1", "llava_med_scores", "llava_open_hit", "mcqa_accuracy", "mcqa_choice",
           "normalize", "normalize_llava_med", "open_hit", "open_recall", "vqa_metrics", "yes_no", "evaluate",
           "read_candidates", "write_report"]
