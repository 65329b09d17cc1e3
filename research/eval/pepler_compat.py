"""The text evaluation of PETER, PEPLER and P5, reimplemented to give the same numbers, faster.

Lei Li's explainable-recommendation repositories (github.com/lileipisces/PETER, ACL 2021;
github.com/lileipisces/PEPLER, TOIS 2023; P5 reuses the same files) score generated texts with:

- ``postprocessing`` in their ``utils.py``: regexes that split punctuation and contractions off
  words ("good!" -> "good !"), then whitespace tokens;
- ``compute_bleu`` in ``bleu.py``, a copy of tensorflow/nmt ``nmt/scripts/bleu.py``: corpus BLEU,
  no smoothing, one reference per sample, x100;
- ``rouge`` in ``rouge.py``, a copy of tensorflow/nmt ``nmt/scripts/rouge.py`` (derived from
  sumy): per-sample ROUGE-1/2 on n-gram *sets* and sentence-level ROUGE-L, averaged, x100;
- ``unique_sentence_percent``, ``feature_detect``, ``feature_matching_ratio``,
  ``feature_coverage_ratio`` and ``feature_diversity`` in ``utils.py``: USR, FMR, FCR and DIV as
  fractions in [0, 1];
- ``root_mean_square_error`` and ``mean_absolute_error`` in ``utils.py``: rating RMSE and MAE,
  each prediction first clamped to the training split's [min, max] rating.

The tests hold every function here to the figures the original code computes on
``../shared/data/metric_fixtures/pepler_metrics.json`` (to 1e-6) and to independent checks
(sacreBLEU, rouge-score, closed forms). Where the originals divide by zero (every prediction
empty, a single sample for DIV, an empty feature vocabulary), the docstrings say what is
returned instead.
"""

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

# `postprocessing` of PEPLER utils.py, rule for rule and in its order (the order matters: the
# contraction rules run before the punctuation rules, and ":" becomes "," as in the original).
_PUNCTUATION_RULES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"'s", " 's"),
        (r"'m", " 'm"),
        (r"'ve", " 've"),
        (r"n't", " n't"),
        (r"'re", " 're"),
        (r"'d", " 'd"),
        (r"'ll", " 'll"),
        (r"\(", " ( "),
        (r"\)", " ) "),
        (r",+", " , "),
        (r":+", " , "),
        (r";+", " . "),
        (r"\.+", " . "),
        (r"!+", " ! "),
        (r"\?+", " ? "),
        (r" +", " "),
    )
)


def pepler_tokenize(text: str) -> list[str]:
    """Tokens as PEPLER's ``ids2tokens`` makes them: ``postprocessing(text).split()``."""
    for pattern, replacement in _PUNCTUATION_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def _ngram_counts(tokens: Sequence[str], order: int) -> Counter:
    """Counts of the ``order``-grams of ``tokens`` (as tuples); empty when there are fewer tokens."""
    # The shifted copies are shorter and shorter on purpose: zip stops at the last full n-gram.
    return Counter(zip(*(tokens[start:] for start in range(order)), strict=False))


def nmt_corpus_bleu(
    references: Sequence[Sequence[str]],
    predictions: Sequence[Sequence[str]],
    orders: Sequence[int] = (1, 4),
) -> dict[int, float]:
    """Corpus BLEU-n x100 for each n in ``orders``, as tensorflow/nmt ``compute_bleu`` (no smoothing).

    Modified n-gram precision p_k = (sum of clipped matches) / (sum of max(len - k + 1, 0)) over
    the corpus, BLEU-n = BP * exp(mean_{k<=n} log p_k), zero when any p_k is zero;
    BP = exp(1 - ref_len / pred_len) when pred_len <= ref_len, else 1. All orders share one pass.
    Where the original raises ZeroDivisionError (every prediction empty) this returns 0.

    Args:
      references: ``[num_samples][ref_len]`` tokens, one reference per sample.
      predictions: ``[num_samples][pred_len]`` tokens.
      orders: the n of each BLEU-n wanted.

    Returns:
      ``{n: BLEU-n x100}``.
    """
    max_order = max(orders)
    matches = np.zeros(max_order, dtype=np.int64)
    possible = np.zeros(max_order, dtype=np.int64)
    for reference, prediction in zip(references, predictions, strict=True):
        for order in range(1, min(max_order, len(prediction)) + 1):
            predicted = _ngram_counts(prediction, order)
            matches[order - 1] += sum((predicted & _ngram_counts(reference, order)).values())
            possible[order - 1] += len(prediction) - order + 1
    prediction_length = sum(len(p) for p in predictions)
    reference_length = sum(len(r) for r in references)

    scores = {}
    for n in orders:
        if (matches[:n] == 0).any():
            scores[n] = 0.0
            continue
        # Non-zero matches imply a non-empty prediction, so prediction_length > 0 here.
        log_precision = np.mean(np.log(matches[:n] / possible[:n]))
        ratio = prediction_length / reference_length
        brevity_penalty = 1.0 if ratio > 1.0 else np.exp(1.0 - 1.0 / ratio)
        scores[n] = float(100.0 * np.exp(log_precision) * brevity_penalty)
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): O(len(a)) int ops.

    ``v`` holds one bit per word of ``b``; after reading a prefix of ``a``, its zero bits mark
    the positions of ``b`` where the LCS of that prefix and ``b[: i + 1]`` grows by one, so
    their count is the LCS length. Same value as the O(len(a) * len(b)) table of the original.
    """
    position_masks: dict[str, int] = {}
    for i, word in enumerate(b):
        position_masks[word] = position_masks.get(word, 0) | (1 << i)
    all_bits = (1 << len(b)) - 1
    v = all_bits
    for word in a:
        u = v & position_masks.get(word, 0)
        v = ((v + u) | (v - u)) & all_bits
    return len(b) - v.bit_count()


def sumy_rouge(
    references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]
) -> dict[str, float]:
    """ROUGE-1/2/L precision, recall and F x100, as PETER/PEPLER ``rouge.py`` (tensorflow/nmt).

    Per sample, on the texts ``" ".join(tokens)`` split on single spaces (so an empty text is one
    empty word, as in the original): ROUGE-N counts the *set* of distinct n-grams (no clipping by
    count), P = |hyp ∩ ref| / |hyp|, R = |hyp ∩ ref| / |ref| (0 when the set is empty),
    F = 2PR / (P + R + 1e-8). ROUGE-L is sentence level: P = LCS / len(hyp), R = LCS / len(ref),
    F = (1 + b^2) R P / (R + b^2 P + 1e-12) with b = P / (R + 1e-12). Each number is the mean over
    samples.

    Args:
      references: ``[num_samples][ref_len]`` tokens.
      predictions: ``[num_samples][pred_len]`` tokens.

    Returns:
      ``rouge_{1,2,l}_{f,p,r}_score`` keys.
    """
    # scores[sample, metric, (f, p, r)] for metric in (rouge_1, rouge_2, rouge_l).
    scores = np.zeros((len(predictions), 3, 3))
    for row, (reference, prediction) in enumerate(zip(references, predictions, strict=True)):
        reference = list(reference) or [""]
        prediction = list(prediction) or [""]
        for metric, order in ((0, 1), (1, 2)):
            hyp_ngrams = set(_ngram_counts(prediction, order))
            ref_ngrams = set(_ngram_counts(reference, order))
            overlap = len(hyp_ngrams & ref_ngrams)
            precision = overlap / len(hyp_ngrams) if hyp_ngrams else 0.0
            recall = overlap / len(ref_ngrams) if ref_ngrams else 0.0
            f_score = 2.0 * ((precision * recall) / (precision + recall + 1e-8))
            scores[row, metric] = (f_score, precision, recall)
        lcs = _lcs_length(prediction, reference)
        precision, recall = lcs / len(prediction), lcs / len(reference)
        beta_squared = (precision / (recall + 1e-12)) ** 2
        f_score = (
            (1 + beta_squared) * recall * precision / (recall + beta_squared * precision + 1e-12)
        )
        scores[row, 2] = (f_score, precision, recall)

    means = 100.0 * scores.mean(axis=0)
    return {
        f"rouge_{name}_{kind}_score": float(means[metric, column])
        for metric, name in enumerate(("1", "2", "l"))
        for column, kind in enumerate(("f", "p", "r"))
    }


def unique_sentence_ratio(predictions: Sequence[Sequence[str]]) -> tuple[float, int]:
    """USR and USN, as PEPLER ``unique_sentence_percent``: distinct token sequences / samples.

    Args:
      predictions: ``[num_samples][pred_len]`` tokens.

    Returns:
      (ratio in [0, 1], number of distinct sequences).
    """
    unique = len({tuple(tokens) for tokens in predictions})
    return unique / len(predictions), unique


def feature_metrics(
    predictions: Sequence[Sequence[str]],
    feature_vocab: Iterable[str],
    features: Sequence[str | Sequence[str]] | None = None,
) -> dict[str, float]:
    """FCR, DIV and (given ``features``) FMR, as PEPLER ``feature_detect`` and its three users.

    Each prediction's features are the *set* of its tokens found in ``feature_vocab``
    (``feature_detect``; repeats within a text count once).

    - FCR (``feature_coverage_ratio``): |union of the sets| / |feature_vocab|.
    - DIV (``feature_diversity``): mean over unordered pairs of samples of |A ∩ B| (lower means
      more diverse). The original loops over all N(N-1)/2 pairs; a feature f found in n_f samples
      is shared by exactly C(n_f, 2) pairs, so the pair sum is sum_f C(n_f, 2), in O(total
      tokens). With fewer than 2 samples there are no pairs; the original divides by zero, this
      returns 0.
    - FMR (``feature_matching_ratio``): fraction of samples whose set contains the sample's
      ground-truth feature. PEPLER has one feature word per sample; a sequence of words counts
      as matched when any of them is in the set (identical for a one-word sequence).

    Args:
      predictions: ``[num_samples][pred_len]`` tokens.
      feature_vocab: all feature words of the data set (PEPLER's ``corpus.feature_set``).
      features: ``[num_samples]`` ground-truth feature word, or words, of each sample.

    Returns:
      ``fcr``, ``div`` and, with ``features``, ``fmr``; fractions in [0, 1] (DIV is >= 0).
    """
    vocab = set(feature_vocab)
    if not vocab:
        raise ValueError("feature_metrics: feature_vocab is empty, so FCR is undefined")
    found = [vocab.intersection(tokens) for tokens in predictions]

    num_samples = len(found)
    samples_per_feature = np.array(
        list(Counter(f for sample in found for f in sample).values()), dtype=np.int64
    )
    shared_pairs = int((samples_per_feature * (samples_per_feature - 1) // 2).sum())
    num_pairs = num_samples * (num_samples - 1) / 2
    metrics = {
        "fcr": len(set().union(*found)) / len(vocab),
        "div": shared_pairs / num_pairs if num_pairs else 0.0,
    }
    if features is not None:
        if len(features) != num_samples:
            raise ValueError(
                f"feature_metrics: features has {len(features)} items but there are "
                f"{num_samples} predictions"
            )
        truths = [{truth} if isinstance(truth, str) else set(truth) for truth in features]
        metrics["fmr"] = (
            sum(not truth.isdisjoint(sample) for truth, sample in zip(truths, found, strict=True))
            / num_samples
        )
    return metrics


def rating_errors(
    true: Sequence[float], predicted: Sequence[float], min_rating: float, max_rating: float
) -> dict[str, float]:
    """RMSE and MAE of ``predicted`` ratings, each clamped to ``[min_rating, max_rating]`` first.

    As PETER/PEPLER ``root_mean_square_error``/``mean_absolute_error``, which clamp to the
    training split's lowest and highest rating.

    Args:
      true: ``[num_samples]`` ground-truth ratings.
      predicted: ``[num_samples]`` predicted ratings (any real numbers).
      min_rating, max_rating: the rating range of the training split.

    Returns:
      ``{"rmse": ..., "mae": ...}``.
    """
    true_array = np.asarray(true, dtype=np.float64)
    predicted_array = np.asarray(predicted, dtype=np.float64)
    if true_array.shape != predicted_array.shape or true_array.ndim != 1 or not len(true_array):
        raise ValueError(
            f"rating_errors: true has shape {true_array.shape} and predicted "
            f"{predicted_array.shape}; both must be the same non-empty [num_samples]"
        )
    if min_rating > max_rating:
        raise ValueError(f"rating_errors: min_rating={min_rating} > max_rating={max_rating}")
    error = np.clip(predicted_array, min_rating, max_rating) - true_array
    return {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error)))}
