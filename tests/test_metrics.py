"""The field's metrics against reference figures and independent checks, never copied code.

* ``../shared/data/metric_fixtures/pepler_metrics.json`` holds inputs and the figures the
  original PETER/PEPLER evaluation code computes for them; every PEPLER key must match to 1e-6.
* BLEU equals sacreBLEU run without its tokenizer or smoothing (same definition, corpus
  level, same brevity penalty); ROUGE-1/2 equal rouge-score on texts without repeated words
  (where counting n-gram sets and clipped counts agree); ROUGE-L precision and recall equal
  rouge-score's on any text (both are LCS / length), and its F follows from them in closed form.
* Hand-computed values for the cases the original divides by zero on, and closed forms for
  USR, FCR, FMR, DIV, RMSE and MAE.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from research.eval.metrics import output_shape_metrics, text_metrics
from research.eval.pepler_compat import (
    feature_metrics,
    nmt_corpus_bleu,
    pepler_tokenize,
    rating_errors,
    sumy_rouge,
)

TOLERANCE = 1e-6
PEPLER_ROUGE_KEYS = [f"rouge_{n}_{k}_score" for n in ("1", "2", "l") for k in ("f", "p", "r")]
FIXTURE = (
    Path(__file__).parents[1] / "../shared/data/metric_fixtures/pepler_metrics.json"
).resolve()


@pytest.fixture(scope="module")
def fixture_cases() -> list[dict]:
    """The shared reference figures; part of the suite's inputs, so missing is a failure."""
    if not FIXTURE.is_file():
        pytest.fail(
            f"shared metric fixture {FIXTURE} is missing: these tests need "
            "../shared/data/metric_fixtures/pepler_metrics.json beside the repository"
        )
    return json.loads(FIXTURE.read_text())["cases"]


def test_text_metrics_match_the_original_figures(fixture_cases):
    assert len(fixture_cases) == 3
    for index, case in enumerate(fixture_cases):
        ours = text_metrics(
            case["references"],
            case["predictions"],
            features=case["test_features"],
            feature_vocab=case["feature_vocab"],
        )
        text_keys = set(case["expected"]) - {"rmse", "mae"}
        assert text_keys == {"bleu1", "bleu4", *PEPLER_ROUGE_KEYS, "usr", "div", "fcr", "fmr"}
        for key in sorted(text_keys):
            assert ours[key] == pytest.approx(case["expected"][key], abs=TOLERANCE), (index, key)


def test_rating_errors_match_the_original_figures_with_clamping(fixture_cases):
    for index, case in enumerate(fixture_cases):
        ratings = case["ratings"]
        ours = rating_errors(ratings["true"], ratings["predicted"], ratings["min"], ratings["max"])
        for key in ("rmse", "mae"):
            assert ours[key] == pytest.approx(case["expected"][key], abs=TOLERANCE), (index, key)
        # The fixture's predictions leave [min, max]: without the clamp the figures differ.
        predicted = np.array(ratings["predicted"])
        assert ((predicted < ratings["min"]) | (predicted > ratings["max"])).any()
        unclamped = rating_errors(ratings["true"], predicted, -np.inf, np.inf)
        assert abs(unclamped["rmse"] - case["expected"]["rmse"]) > 1e-3, index


def test_rating_errors_closed_form():
    # Clamped to [1, 5]: predictions 0 -> 1, 6 -> 5, 3.5 stays; errors 0, -1, 0.5.
    errors = rating_errors([1.0, 4.0, 4.0], [0.0, 3.0, 6.0], 1.0, 5.0)
    assert errors["mae"] == pytest.approx((0 + 1 + 1) / 3)
    assert errors["rmse"] == pytest.approx(math.sqrt((0 + 1 + 1) / 3))
    assert rating_errors([2.0], [3.5], 1.0, 5.0) == {"rmse": 1.5, "mae": 1.5}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1.0], [1.0, 2.0], 1, 5), "same non-empty"),
        (([], [], 1, 5), "same non-empty"),
        (([1.0], [1.0], 5, 1), "min_rating=5 > max_rating=1"),
    ],
)
def test_rating_errors_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        rating_errors(*args)


def sacrebleu_score(references, predictions, order: int) -> float:
    """sacreBLEU on pre-tokenized texts: whitespace tokens, no smoothing, BLEU-``order``."""
    bleu = BLEU(tokenize="none", smooth_method="none", max_ngram_order=order, force=True)
    joined = [" ".join(tokens) for tokens in predictions]
    return bleu.corpus_score(joined, [[" ".join(tokens) for tokens in references]]).score


class _Whitespace:
    """rouge-score tokenizer that keeps our tokens as they are."""

    def tokenize(self, text):
        return text.split()


LIBRARY_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Whitespace())


def library_rouge(references, predictions) -> dict[str, float]:
    """Mean rouge-score precision / recall / F x100 per type, on our tokens."""
    scores = [
        LIBRARY_ROUGE.score(" ".join(ref), " ".join(pred))
        for ref, pred in zip(references, predictions, strict=True)
    ]
    return {
        f"{rouge_type}_{kind}": 100 * float(np.mean([getattr(s[rouge_type], kind) for s in scores]))
        for rouge_type in ("rouge1", "rouge2", "rougeL")
        for kind in ("precision", "recall", "fmeasure")
    }


def assert_bleu_matches_sacrebleu(references, predictions):
    ours = nmt_corpus_bleu(references, predictions, orders=(1, 2, 4))
    for order in (1, 2, 4):
        expected = sacrebleu_score(references, predictions, order)
        assert ours[order] == pytest.approx(expected, abs=TOLERANCE), order


def assert_rouge_l_matches_library(references, predictions):
    ours, library = sumy_rouge(references, predictions), library_rouge(references, predictions)
    assert ours["rouge_l_p_score"] == pytest.approx(library["rougeL_precision"], abs=TOLERANCE)
    assert ours["rouge_l_r_score"] == pytest.approx(library["rougeL_recall"], abs=TOLERANCE)


EDGE_CASES = {
    "identical": (
        ["the sound is great", "it's a solid stand ."],
        ["the sound is great", "it's a solid stand ."],
    ),
    "one_empty_prediction": (["great strings , nice tone", "works well"], ["", "works well"]),
    "shorter_than_n": (["the cable is too short", "nice", "so so"], ["the cable", "nice", "so"]),
    "repeated_words": (
        ["good good price", "the the the tuner"],
        ["good good good good", "the tuner tuner the the"],
    ),
    "punctuation": (
        ["It's great!!! I didn't (really) like: the size; ok...", "Works,,, fine?? yes!"],
        ["it's great! I didn't like the size...", "works , fine ? yes !"],
    ),
    "empty_reference": (["", "solid pedal"], ["solid", "solid pedal"]),
    "long_and_short": (
        ["a b c d e f g h i j k l m n o p", "x"],
        ["a b c x d e f y g h", "x y z w v"],
    ),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_match_sacrebleu_and_rouge_score(case):
    references, predictions = ([pepler_tokenize(t) for t in texts] for texts in EDGE_CASES[case])
    assert_bleu_matches_sacrebleu(references, predictions)
    assert_rouge_l_matches_library(references, predictions)


def test_hand_computed_prefix_prediction():
    # ref "the cat sat on the mat" (6 tokens), pred "the cat sat" (3): every pred n-gram matches.
    metrics = text_metrics(["the cat sat on the mat"], ["the cat sat"])
    assert metrics["bleu1"] == pytest.approx(100 * math.exp(1 - 6 / 3), abs=TOLERANCE)
    assert metrics["bleu4"] == 0.0  # no 4-gram in a 3-token prediction: p_4 = 0
    # ROUGE uses distinct n-gram sets: ref unigrams {the, cat, sat, on, mat}, bigrams 5.
    assert metrics["rouge_1_p_score"] == pytest.approx(100.0, abs=TOLERANCE)
    assert metrics["rouge_1_r_score"] == pytest.approx(60.0, abs=TOLERANCE)
    assert metrics["rouge_1_f_score"] == pytest.approx(75.0, abs=TOLERANCE)
    assert metrics["rouge_2_r_score"] == pytest.approx(40.0, abs=TOLERANCE)
    # LCS 3: P = 1, R = 1/2, beta = 2, F = 5 * 0.5 / (0.5 + 4) = 5/9.
    assert metrics["rouge_l_r_score"] == pytest.approx(50.0, abs=TOLERANCE)
    assert metrics["rouge_l_f_score"] == pytest.approx(500 / 9, abs=TOLERANCE)


def test_hand_computed_repeats_are_clipped_in_bleu_and_collapsed_in_rouge():
    metrics = text_metrics(["good"], ["good good good"])
    assert metrics["bleu1"] == pytest.approx(100 / 3, abs=TOLERANCE)  # 1 clipped match of 3
    assert metrics["rouge_1_p_score"] == pytest.approx(100.0, abs=TOLERANCE)  # {good} vs {good}
    assert metrics["rouge_l_p_score"] == pytest.approx(100 / 3, abs=TOLERANCE)  # LCS 1 of 3 words


def test_hand_computed_all_predictions_empty():
    # The original divides by zero here (prediction length 0); no n-gram matches, so BLEU is 0.
    metrics = text_metrics(["great sound", "nice"], ["", ""])
    assert metrics["bleu1"] == 0.0 and metrics["bleu4"] == 0.0
    assert all(metrics[key] == 0.0 for key in PEPLER_ROUGE_KEYS)
    assert metrics["usr"] == 0.5 and metrics["usn"] == 1


def test_all_references_empty_gives_zero_bleu():
    # The original divides by zero (reference length 0); nothing can match.
    metrics = text_metrics(["", ""], ["some words", "more"])
    assert metrics["bleu1"] == 0.0 and metrics["bleu4"] == 0.0


def test_tokenizer_splits_punctuation_and_contractions_by_the_rules():
    # Contractions split before punctuation rules run; ":" becomes "," and ";" becomes ".".
    text = "It's great!!! I didn't (really) like: it; ok... We'll, they're, I'd, I've, I'm?"
    expected = (
        "It 's great ! I did n't ( really ) like , it . ok . We 'll , they 're , I 'd , I 've"
    )
    assert pepler_tokenize(text) == [*expected.split(" "), ",", "I", "'m", "?"]
    assert pepler_tokenize("good!") == ["good", "!"]


WORDS = [
    "good", "bad", "sound", "tone", "it's", "don't", "great!", "!!", "...", ",", "(", ")",
    "a", "the", "strings", "pedal:", "ok;", "why?", "we'll", "",
]  # fmt: skip
texts = st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=1, max_size=8))
def test_random_corpora_bleu_and_rouge_l_match_the_libraries(pairs):
    references = [pepler_tokenize(ref) for ref, _ in pairs]
    predictions = [pepler_tokenize(pred) for _, pred in pairs]
    assume(any(references) and any(predictions))
    assert_bleu_matches_sacrebleu(references, predictions)
    # An empty text is one empty word here and no words in rouge-score: they agree on 0
    # unless both sides are empty.
    assume(all(ref or pred for ref, pred in zip(references, predictions, strict=True)))
    assert_rouge_l_matches_library(references, predictions)


distinct_words = st.lists(st.sampled_from("abcdefghij"), min_size=1, max_size=10, unique=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(distinct_words, distinct_words), min_size=1, max_size=6))
def test_rouge_n_on_distinct_words_matches_rouge_score(pairs):
    # No repeated word means no repeated n-gram: sets and clipped counts coincide.
    references = [ref for ref, _ in pairs]
    predictions = [pred for _, pred in pairs]
    ours, library = sumy_rouge(references, predictions), library_rouge(references, predictions)
    for n in ("1", "2"):
        for kind, name in (("p", "precision"), ("r", "recall"), ("f", "fmeasure")):
            # Our F adds 1e-8 to its denominator as the original does: at most 5e-7 off x100.
            expected = library[f"rouge{n}_{name}"]
            assert ours[f"rouge_{n}_{kind}_score"] == pytest.approx(expected, abs=TOLERANCE)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from("abcde"), min_size=1, max_size=150),
            st.lists(st.sampled_from("abcde"), min_size=1, max_size=150),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_rouge_l_on_long_texts_matches_rouge_score(pairs):
    # Beyond 64 words the bit-parallel LCS runs on multi-word integers.
    references = [ref for ref, _ in pairs]
    predictions = [pred for _, pred in pairs]
    assert_rouge_l_matches_library(references, predictions)
    # F from P and R in closed form: beta = P / R, F = (1 + beta^2) R P / (R + beta^2 P).
    ours = sumy_rouge(references, predictions)
    f_scores = []
    for ref, pred in zip(references, predictions, strict=True):
        scores = LIBRARY_ROUGE.score(" ".join(ref), " ".join(pred))["rougeL"]
        p, r = scores.precision, scores.recall
        beta_squared = (p / (r + 1e-12)) ** 2
        f_scores.append((1 + beta_squared) * r * p / (r + beta_squared * p + 1e-12))
    assert ours["rouge_l_f_score"] == pytest.approx(100 * np.mean(f_scores), abs=TOLERANCE)


FEATURE_VOCAB = ["sound", "tone", "price", "strings", "pedal", "cable"]
feature_tokens = st.lists(
    st.sampled_from([*FEATURE_VOCAB, "good", "the", "nice", "!"]), max_size=10
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(feature_tokens, st.sampled_from(FEATURE_VOCAB)), min_size=2, max_size=30))
def test_feature_metrics_equal_their_definitions(rows):
    predictions = [tokens for tokens, _ in rows]
    features = [feature for _, feature in rows]
    vocab = set(FEATURE_VOCAB)
    found = [vocab.intersection(tokens) for tokens in predictions]
    # O(N^2) DIV: mean over pairs of |A ∩ B|, A and B the sets of feature words found.
    pairs = [(i, j) for i in range(len(found)) for j in range(i + 1, len(found))]
    expected = {
        "div": sum(len(found[i] & found[j]) for i, j in pairs) / len(pairs),
        "fcr": len(set().union(*found)) / len(vocab),
        "fmr": np.mean([feature in tokens for tokens, feature in rows]),
    }
    ours = feature_metrics(predictions, FEATURE_VOCAB, features)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=TOLERANCE), key


def test_usr_counts_distinct_token_sequences():
    # "good !" and "good!" tokenize alike; 2 distinct of 4.
    metrics = text_metrics(["a"] * 4, ["good !", "good!", "bad", "bad"])
    assert (metrics["usr"], metrics["usn"]) == (0.5, 2)


def test_div_of_a_single_sample_is_zero():
    # No pairs: the original divides by zero; no feature is shared by any pair.
    assert feature_metrics([["sound"]], {"sound"})["div"] == 0.0


def test_fmr_with_several_ground_truth_words_matches_any():
    predictions = [["great", "tone"], ["cheap", "cable"], ["nice"]]
    metrics = feature_metrics(
        predictions, {"tone", "cable", "sound"}, [("sound", "tone"), ["sound"], "nice"]
    )
    assert metrics["fmr"] == pytest.approx(1 / 3)
    assert metrics["fcr"] == pytest.approx(2 / 3)


def test_library_keys_equal_direct_library_calls():
    references = ["The strings sound bright and warm.", "Cable broke after a week"]
    predictions = ["the strings sound warm", "cables broke after one week!"]
    metrics = text_metrics(references, predictions)
    assert metrics["sacrebleu"] == pytest.approx(
        sacrebleu.corpus_bleu(predictions, [references]).score, abs=TOLERANCE
    )
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        f_scores = [
            scorer.score(r, p)[rouge_type].fmeasure
            for r, p in zip(references, predictions, strict=True)
        ]
        assert metrics[f"google_{rouge_type}_f"] == pytest.approx(
            100 * sum(f_scores) / len(f_scores), abs=TOLERANCE
        )


def test_output_length_and_stutter_share():
    predictions = ["i was a a a book", "good food", "a b a b"]
    assert output_shape_metrics(predictions) == {
        "mean_length": 4.0,  # (6 + 2 + 4) / 3 tokens
        "repeat3_share": pytest.approx(1 / 3),  # only "a a a" repeats a token 3 times in a row
    }


def test_bleu1_rewards_stuttering_up_to_the_reference_length():
    """Why evaluation reports length and stutters: below the reference's length every extra
    "a" shrinks the brevity penalty more than it costs in clipped unigram precision."""
    reference = ["i was reading a good book"]
    bleu1 = [text_metrics(reference, [f"i was {'a ' * n}book"])["bleu1"] for n in (1, 2, 3)]
    assert bleu1[0] < bleu1[1] < bleu1[2]


def test_keys():
    metrics = text_metrics(["a b"], ["a b"], features=["a"], feature_vocab={"a"})
    assert set(metrics) == {
        "bleu1", "bleu4", *PEPLER_ROUGE_KEYS, "usr", "usn", "fmr", "fcr", "div",
        "sacrebleu", "google_rouge1_f", "google_rouge2_f", "google_rougeL_f", "google_rougeLsum_f",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(references=["a"], predictions=["a", "b"]), ValueError, "references has 1 items"),
        (dict(references=[], predictions=[]), ValueError, "no predictions"),
        (dict(references=["a"], predictions=["a"], features=["a"]), ValueError, "feature_vocab"),
        (dict(references=["a"], predictions=[["a"]]), TypeError, r"predictions\[0\] is list"),
        (dict(references=["a"], predictions=["a"], compat="p5"), ValueError, "compat='p5'"),
        (dict(references=["a"], predictions=["a"], feature_vocab=[]), ValueError, "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        text_metrics(**kwargs)
