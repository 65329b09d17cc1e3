"""text_metrics against the original PETER/PEPLER evaluation code (vendored in tests/reference),
hand-computed values, and direct calls of sacrebleu / rouge-score."""

import math
import warnings

import pytest
import sacrebleu
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from research.eval.metrics import text_metrics
from research.eval.pepler_compat import feature_metrics, pepler_tokenize, sumy_rouge

with warnings.catch_warnings():
    # The vendored original writes regexes as non-raw strings ('\\('), which Python flags once
    # when it compiles the file; the code stays as published.
    warnings.simplefilter("ignore", DeprecationWarning)
    from tests.reference import pepler_utils as original

TOLERANCE = 1e-6
PEPLER_ROUGE_KEYS = [f"rouge_{n}_{k}_score" for n in ("1", "2", "l") for k in ("f", "p", "r")]


def original_metrics(references, predictions, features=None, feature_vocab=None):
    """The metric section of PEPLER main.py, run on the vendored original functions."""
    tokens_test = [original.postprocessing(text).split() for text in references]
    tokens_predict = [original.postprocessing(text).split() for text in predictions]
    usr, usn = original.unique_sentence_percent(tokens_predict)
    rouge = original.rouge_score(
        [" ".join(tokens) for tokens in tokens_test],
        [" ".join(tokens) for tokens in tokens_predict],
    )
    metrics = {
        "bleu1": original.bleu_score(tokens_test, tokens_predict, n_gram=1, smooth=False),
        "bleu4": original.bleu_score(tokens_test, tokens_predict, n_gram=4, smooth=False),
        **{key.replace("/", "_"): value for key, value in rouge.items()},
        "usr": usr,
        "usn": usn,
    }
    if feature_vocab is not None:
        feature_batch = original.feature_detect(tokens_predict, set(feature_vocab))
        metrics["div"] = original.feature_diversity(feature_batch)
        metrics["fcr"] = original.feature_coverage_ratio(feature_batch, set(feature_vocab))
        if features is not None:
            metrics["fmr"] = original.feature_matching_ratio(feature_batch, features)
    return metrics


def assert_matches_original(references, predictions, features=None, feature_vocab=None):
    ours = text_metrics(references, predictions, features=features, feature_vocab=feature_vocab)
    expected = original_metrics(references, predictions, features, feature_vocab)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=TOLERANCE), key


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
def test_edge_cases_match_original(case):
    references, predictions = EDGE_CASES[case]
    assert_matches_original(references, predictions)


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


def test_tokenizer_splits_punctuation_and_contractions_like_the_original():
    text = "It's great!!! I didn't (really) like: it; ok... We'll, they're, I'd, I've, I'm?"
    assert pepler_tokenize(text) == original.postprocessing(text).split()
    assert pepler_tokenize("good!") == ["good", "!"]


WORDS = [
    "good", "bad", "sound", "tone", "it's", "don't", "great!", "!!", "...", ",", "(", ")",
    "a", "the", "strings", "pedal:", "ok;", "why?", "we'll", "",
]  # fmt: skip
texts = st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=1, max_size=8))
def test_random_corpora_match_original(pairs):
    references, predictions = (list(column) for column in zip(*pairs, strict=True))
    # The original BLEU divides by zero when every reference or every prediction is empty
    # (covered by the hand-computed tests above).
    assume(any(pepler_tokenize(text) for text in references))
    assume(any(pepler_tokenize(text) for text in predictions))
    assert_matches_original(references, predictions)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from("abcde"), max_size=150),
            st.lists(st.sampled_from("abcde"), max_size=150),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_rouge_on_long_texts_matches_original(pairs):
    # Beyond 64 words the bit-parallel LCS runs on multi-word integers.
    references = [list(ref) for ref, _ in pairs]
    predictions = [list(pred) for _, pred in pairs]
    expected = original.rouge_score(
        [" ".join(ref) for ref in references], [" ".join(pred) for pred in predictions]
    )
    ours = sumy_rouge(references, predictions)
    for key, value in expected.items():
        assert ours[key.replace("/", "_")] == pytest.approx(value, abs=TOLERANCE), key


FEATURE_VOCAB = ["sound", "tone", "price", "strings", "pedal", "cable"]
feature_texts = st.lists(
    st.sampled_from([*FEATURE_VOCAB, "good", "the", "nice", "!"]), max_size=10
).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(texts, feature_texts, st.sampled_from(FEATURE_VOCAB)), min_size=2, max_size=30
    )
)
def test_random_feature_sets_match_original(rows):
    references, predictions, features = (list(column) for column in zip(*rows, strict=True))
    assume(any(pepler_tokenize(text) for text in references))
    assume(any(pepler_tokenize(text) for text in predictions))
    assert_matches_original(references, predictions, features, FEATURE_VOCAB)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "d", "x", "y"]), max_size=8), min_size=2))
def test_div_equals_pairwise_definition(token_lists):
    vocab = {"a", "b", "c", "d"}
    # O(N^2) definition: mean over pairs of |A ∩ B|, A and B the sets of feature words found.
    found = [vocab.intersection(tokens) for tokens in token_lists]
    pairs = [(i, j) for i in range(len(found)) for j in range(i + 1, len(found))]
    expected = sum(len(found[i] & found[j]) for i, j in pairs) / len(pairs)
    assert feature_metrics(token_lists, vocab)["div"] == pytest.approx(expected, abs=TOLERANCE)


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
