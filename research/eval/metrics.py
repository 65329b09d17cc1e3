"""Text metrics for generated reviews: the field's own evaluation plus standard library scores.

``text_metrics`` returns, in one dict:

- with ``compat="pepler"``, the numbers PETER, PEPLER and P5 publish, computed as their code does
  (see ``research.eval.pepler_compat``): ``bleu1``, ``bleu4``, ``rouge_{1,2,l}_{f,p,r}_score``
  (x100), ``usr``, ``usn``, and given a feature vocabulary ``fcr``, ``div``, ``fmr`` (fractions);
- standard scores from the reference libraries, on the raw strings: ``sacrebleu`` (sacreBLEU
  corpus BLEU with its defaults: 13a tokenizer, 'exp' smoothing; x100) and
  ``google_rouge{1,2,L,Lsum}_f`` (Google ``rouge-score`` F-measure with the Porter stemmer,
  averaged over samples, x100; ``rougeLsum`` splits summaries on newlines, so it equals
  ``rougeL`` for one-line reviews).
"""

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenize, tokenizers

from research.eval.pepler_compat import (
    feature_metrics,
    nmt_corpus_bleu,
    pepler_tokenize,
    sumy_rouge,
    unique_sentence_ratio,
)

GOOGLE_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class _CachedStemmerTokenizer(tokenizers.Tokenizer):
    """rouge-score's ``DefaultTokenizer(use_stemmer=True)`` with each word's stem cached.

    Same tokens (same ``tokenize.tokenize``, same nltk Porter stemmer, which is a pure function of
    the word); uncached, stemming was ~85% of the run time of ``library_metrics``.
    """

    def __init__(self):
        self.stem = functools.lru_cache(maxsize=None)(porter.PorterStemmer().stem)

    def tokenize(self, text: str) -> list[str]:
        # tokenize.tokenize only calls `stemmer.stem(word)`, so this object serves as the stemmer.
        return tokenize.tokenize(text, self)


def library_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """sacreBLEU and Google rouge-score on the raw strings, x100.

    Args:
      references: ``[num_samples]`` reference texts.
      predictions: ``[num_samples]`` generated texts.

    Returns:
      ``sacrebleu`` (``sacrebleu.corpus_bleu(predictions, [references]).score``) and
      ``google_<type>_f`` for each type in ``GOOGLE_ROUGE_TYPES`` (mean per-sample F-measure of
      ``RougeScorer(GOOGLE_ROUGE_TYPES, use_stemmer=True).score(reference, prediction)``).
    """
    scorer = rouge_scorer.RougeScorer(list(GOOGLE_ROUGE_TYPES), tokenizer=_CachedStemmerTokenizer())
    per_sample = [
        scorer.score(ref, pred) for ref, pred in zip(references, predictions, strict=True)
    ]
    metrics = {
        "sacrebleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    }
    for rouge_type in GOOGLE_ROUGE_TYPES:
        f_scores = [scores[rouge_type].fmeasure for scores in per_sample]
        metrics[f"google_{rouge_type}_f"] = float(100.0 * np.mean(f_scores))
    return metrics


def output_shape_metrics(predictions: Sequence[str], run: int = 3) -> dict[str, float]:
    """How long the outputs are and how many stutter, in the tokens BLEU counts.

    Returns ``mean_length`` (mean tokens per output, ``pepler_tokenize``) and
    ``repeat3_share`` (the fraction of outputs with a token ``run``+ times in a row, e.g.
    "a a a"). Degenerate greedy output ("I was a a a a a book.") can raise BLEU-1: each extra
    token shrinks the brevity penalty while "a" keeps matching the reference's unigrams.
    """
    tokens = [pepler_tokenize(text) for text in predictions]

    def stutters(words: list[str]) -> bool:
        return any(len(set(words[i : i + run])) == 1 for i in range(len(words) - run + 1))

    return {
        "mean_length": float(np.mean([len(words) for words in tokens])) if tokens else 0.0,
        "repeat3_share": float(np.mean([stutters(words) for words in tokens])) if tokens else 0.0,
    }


def text_metrics(
    references: Sequence[str],
    predictions: Sequence[str],
    features: Sequence[str | Sequence[str]] | None = None,
    feature_vocab: Iterable[str] | None = None,
    compat: str = "pepler",
) -> dict[str, float]:
    """Scores generated texts against references.

    Args:
      references: ``[num_samples]`` reference texts.
      predictions: ``[num_samples]`` generated texts, aligned with ``references``.
      features: ``[num_samples]`` ground-truth feature word (or words) of each sample, for FMR.
        Needs ``feature_vocab``.
      feature_vocab: every feature word of the data set, for FCR and DIV (and FMR).
      compat: ``"pepler"``: the evaluation of PETER / PEPLER / P5 (the only one supported).

    Returns:
      PEPLER keys ``bleu1``, ``bleu4``, ``rouge_{1,2,l}_{f,p,r}_score``, ``usr``, ``usn``, then
      ``fcr``, ``div`` when ``feature_vocab`` is given and ``fmr`` when ``features`` is too;
      library keys ``sacrebleu``, ``google_rouge{1,2,L,Lsum}_f``. Definitions: module docstrings
      of this module and of ``research.eval.pepler_compat``.
    """
    if compat != "pepler":
        raise ValueError(f"text_metrics: unknown compat={compat!r}; supported: 'pepler'")
    if len(references) != len(predictions):
        raise ValueError(
            f"text_metrics: references has {len(references)} items but predictions has "
            f"{len(predictions)}"
        )
    if not predictions:
        raise ValueError("text_metrics: no predictions to score")
    if features is not None and feature_vocab is None:
        raise ValueError("text_metrics: features (for FMR) needs feature_vocab as well")
    for name, texts in (("references", references), ("predictions", predictions)):
        not_text = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if not_text is not None:
            raise TypeError(
                f"text_metrics: {name}[{not_text}] is {type(texts[not_text]).__name__}, not str"
            )

    reference_tokens = [pepler_tokenize(text) for text in references]
    prediction_tokens = [pepler_tokenize(text) for text in predictions]
    bleu = nmt_corpus_bleu(reference_tokens, prediction_tokens, orders=(1, 4))
    usr, usn = unique_sentence_ratio(prediction_tokens)
    metrics = {
        "bleu1": bleu[1],
        "bleu4": bleu[4],
        **sumy_rouge(reference_tokens, prediction_tokens),
        "usr": usr,
        "usn": usn,
    }
    if feature_vocab is not None:
        metrics.update(feature_metrics(prediction_tokens, feature_vocab, features))
    metrics.update(library_metrics(references, predictions))
    return metrics
