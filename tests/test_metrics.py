"""Evaluation metrics against hand-computed values and the published examples of the tools SEEKR scores with.

The rouge (pltrdy 1.0.1), fuzzywuzzy 0.18 + python-Levenshtein and sacrebleu 13a values written here were also
checked against those packages once, outside the test suite (they are not dependencies of the project).
"""
import pytest

from minseekr.evaluation.metrics import (
    backward_transfer, delta_general_ability, edit_distance, edit_similarity, exact_match, first_char_accuracy,
    format_matrix, forward_transfer, general_ability, overall_performance, restore_literals, rouge_l, sari,
    sari_operations, score, task_metric, _tokenize_13a,
)

EPS = 1e-8  # the rouge package's F = 2PR / (P + R + 1e-8)


# ---- accuracy -----------------------------------------------------------------------------------------------

def test_exact_match_compares_stripped_strings():
    assert exact_match(" 17 ", "17") == 1.0
    assert exact_match("17.0", "17") == 0.0
    assert exact_match("pos", "POS") == 0.0


def test_first_char_accuracy_reads_the_letter_of_a_multiple_choice_answer():
    assert first_char_accuracy("B. hawkish", "B") == 1.0
    assert first_char_accuracy(" A", "A") == 1.0
    assert first_char_accuracy("C", "A") == 0.0
    assert first_char_accuracy("", "A") == 0.0


# ---- ROUGE-L ------------------------------------------------------------------------------------------------

def test_rouge_l_on_lins_example_sentences():
    # Lin 2004, §3.1: reference "police killed the gunman"; S2 shares "police the gunman" (LCS 3 of 4 words),
    # S3 shares "the gunman" (LCS 2): ROUGE-L = 3/4 and 2/4.
    ref = "police killed the gunman"
    assert rouge_l("police kill the gunman", ref, variant="lcs") == 0.75
    assert rouge_l("the gunman kill police", ref, variant="lcs") == 0.5
    # The rouge package agrees up to its epsilon on single sentences without repeated words.
    assert rouge_l("police kill the gunman", ref) == 2 * 0.75 * 0.75 / (1.5 + EPS)
    assert rouge_l("the gunman kill police", ref) == 2 * 0.5 * 0.5 / (1.0 + EPS)


def test_rouge_l_lcs_counts_repeated_words_but_the_rouge_package_counts_distinct_words():
    pred, ref = "the cat sat on the mat", "the cat on the mat"
    # Tokens: LCS "the cat on the mat" = 5 of 6 and 5 of 5 → F = 2·5/(6+5).
    assert rouge_l(pred, ref, variant="lcs") == pytest.approx(10 / 11, abs=1e-15)
    # Distinct words: {the, cat, on, mat} of {the, cat, sat, on, mat} and of {the, cat, on, mat} → P=1, R=4/5.
    assert rouge_l(pred, ref) == 2 * 1.0 * 0.8 / (1.8 + EPS)
    assert rouge_l(pred, ref) == 0.8888888839506174            # rouge 1.0.1's value


def test_rouge_l_package_splits_sentences_at_periods_and_unions_their_lcs():
    # Sentences [a b], [c d] against [a c], [b d]: the four pairs' LCS words union to {a, b, c, d}.
    assert rouge_l("a b. c d", "a c. b d") == 2 / (2 + EPS)
    # As tokens "b." ≠ "b" and "c" ≠ "c.": LCS "a d" = 2 of 4 each.
    assert rouge_l("a b. c d", "a c. b d", variant="lcs") == 0.5
    # A trailing ". " leaves a whitespace-only sentence, i.e. one empty word: 2 of 3 distinct words match.
    assert rouge_l("Hello world. ", "Hello world") == 0.7999999952000001   # rouge 1.0.1's value


def test_rouge_l_finds_the_same_lcs_as_the_rouge_package_when_several_exist():
    # "b a" vs "a b": one word matches either way; the package's walk finds one of them: P = R = 1/2.
    assert rouge_l("b a", "a b") == 0.4999999950000001
    # "a a b" vs "a b a": the LCS "a b" covers both distinct words (F ≈ 1), "a a" only one (F = 1/2);
    # the package's walk (step back in the prediction only on a strictly longer prefix) finds "a b".
    assert rouge_l("a a b", "a b a") == 2 / (2 + EPS)
    assert rouge_l("a a b", "a b a", variant="lcs") == pytest.approx(2 / 3, abs=1e-15)


def test_rouge_l_of_empty_or_dot_only_text_is_zero():
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("...", "a b") == 0.0
    assert rouge_l("a b", "a b", variant="lcs") == 1.0
    assert rouge_l("", "a b", variant="lcs") == 0.0
    with pytest.raises(ValueError, match="variant"):
        rouge_l("a", "a", variant="rouge-2")


# ---- edit similarity ----------------------------------------------------------------------------------------

def test_levenshtein_distance_kitten_sitting():
    assert edit_distance("kitten", "sitting") == 3                       # k→s, e→i, +g
    assert edit_distance("kitten", "sitting", substitution_cost=2) == 5  # indel: 6 + 7 − 2·|"ittn"|
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "abc") == 0


def test_edit_similarity_is_fuzz_ratio():
    assert edit_similarity("kitten", "sitting") == 62    # round(100 · (1 − 5/13)) = round(61.54)
    assert edit_similarity("flaw", "lawn") == 75         # round(100 · (1 − 2/8))
    assert edit_similarity("abc", "abc") == 100
    assert edit_similarity("", "") == 100               # fuzz.ratio checks equality before emptiness
    assert edit_similarity("", "abc") == 0
    # An exact half in decimal is not one in floats: 1 − 78/80 = 0.025000000000000022 → 3 (fuzz.ratio too).
    assert edit_similarity("a", "x" * 39 + "a" + "y" * 39) == 3


def test_py150_literal_placeholders_are_restored_before_scoring():
    assert restore_literals('x = <NUM_LIT> + <NUM_LIT:3> ; s = "<STR_LIT>" + <STR_LIT:hi> + <CHAR_LIT:c>') == \
        'x = 0 + 3 ; s = "" + hi + c'
    assert score("Py150", ["x = <NUM_LIT>"], ["x = 0"]) == 100


# ---- SARI ---------------------------------------------------------------------------------------------------

PUBLISHED_REFS = ["About 95 species are currently known .", "About 95 species are now accepted .",
                  "95 species are now accepted ."]


def test_sari_published_examples_of_hf_evaluate():
    # The metric card of HF evaluate's "sari": partial match 26.953601953601954, perfect match 100.
    assert sari("About 95 species are currently accepted .", "About 95 you now get in .", PUBLISHED_REFS) == \
        26.953601953601954
    assert sari("About 95 species are currently accepted .", "About 95 species are currently accepted .",
                ["About 95 species are currently accepted ."]) == 100.0
    # The card's "how to use" writes the periods unspaced; 13a tokenisation splits them off.
    assert sari("About 95 species are currently accepted.", "About 95 you now get in.",
                [r.replace(" .", ".") for r in PUBLISHED_REFS]) == 26.953601953601954


def test_sari_operation_scores_of_the_published_example():
    # keep 22.527…, del 50, add 8.333… as printed by a published fork of the same metric that reports them.
    keep, delete, add = sari_operations("About 95 species are currently accepted .", "About 95 you now get in .",
                                        PUBLISHED_REFS)
    assert (100 * keep, 100 * delete, 100 * add) == pytest.approx((22.527472527472525, 50.0, 8.333333333333333))


def test_sari_hand_computed():
    # Copying the source "a b" when the reference is "a c": unigram keep P = 1/2 (b kept wrongly), R = 1,
    # F = 2/3; bigram keep P = 0, F = 0; no deletion (0/0 = 1); nothing added though "c" was needed:
    # add F = 0 for n = 1, 2; n = 3, 4 have no n-grams at all (1 each).
    # keep (2/3 + 0 + 1 + 1)/4 = 2/3, del 1, add (0 + 0 + 1 + 1)/4 = 1/2 → SARI = 100 · (13/6)/3.
    assert sari("a b", "a b", ["a c"]) == pytest.approx(100 * 13 / 18, abs=1e-12)
    # Making exactly the reference's edit scores 100.
    assert sari("a b", "a c", ["a c"]) == 100.0


def test_13a_tokenisation_splits_punctuation_but_not_numbers():
    assert _tokenize_13a("Hello, world! It's 1,000.5 (3-4) a/b.") == "Hello , world ! It's 1,000.5 ( 3 - 4 ) a / b ."
    assert _tokenize_13a("a &amp; b &quot;c&quot;\nco-\nop") == 'a & b " c " coop'


# ---- test-set scores ----------------------------------------------------------------------------------------

def test_task_metrics_follow_the_official_table():
    assert [task_metric(t) for t in ("FOMC", "C-STANCE")] == ["first-char-accuracy"] * 2
    assert task_metric("ScienceQA") == "letter-accuracy"
    assert [task_metric(t) for t in ("NumGLUE-cm", "NumGLUE-ds")] == ["accuracy"] * 2
    assert (task_metric("MeetingBank"), task_metric("Py150"), task_metric("20Minuten")) == \
        ("rouge-l", "similarity", "sari")
    assert task_metric("task363_sst2_polarity_classification") == "accuracy"
    assert task_metric("task195_sentiment140_classification") == "accuracy"
    assert task_metric("task875") == "accuracy"
    assert task_metric("task073_commonsenseqa_answer_generation") == "rouge-l"   # SEEKR: ROUGE-L for QA too
    assert task_metric("task3630_other") == "accuracy"                           # not task363: default
    assert task_metric("my-custom-task") == "accuracy"


def test_score_is_a_0_to_100_mean_with_empty_predictions_counted_as_zero():
    assert score("FOMC", ["A", "B", "", "A is my answer"], ["A", "A", "A", "A"]) == 50.0
    assert score("accuracy", ["POS", " "], ["POS", "POS"]) == 50.0
    assert score("task181", ["police kill the gunman"], ["police killed the gunman"]) == \
        pytest.approx(100 * 0.75, abs=1e-6)
    assert score("Py150", ["kitten", ""], ["sitting", ""]) == 31.0      # (62 + 0) / 2


def test_scienceqa_compares_first_characters_of_both_sides_as_the_official_evaluation():
    # Reasoning-augmented ScienceQA references are the letter, then the reasoning; the official code cuts both.
    assert score("ScienceQA", ["B", "A"], ["B\nBecause magnets attract.", "C\nBecause ..."]) == 50.0
    assert score("FOMC", ["B"], ["B\nBecause ..."]) == 0.0       # C-STANCE and FOMC compare the whole reference


def test_a_blank_prediction_is_scored_as_a_single_space_as_the_official_code_does():
    assert score("Py150", ["", "  \n"], ["a b", "a b"]) == 50.0     # fuzz.ratio(" ", "a b") = 2·1 / 4
    assert score("task181", [""], ["police killed the gunman"]) == 0.0
    src, refs = ["About 95 species are currently accepted ."], [PUBLISHED_REFS]
    blank = score("20Minuten", [""], refs, sources=src)
    assert blank == score("20Minuten", [" "], refs, sources=src) and blank > 0


def test_score_takes_the_best_of_several_references():
    assert score("task002", ["Deshin Shekpa."], [["someone else", "Deshin Shekpa."]]) == pytest.approx(100, abs=1e-6)
    assert score("task363", ["NEG"], [("POS", "NEG")]) == 100.0


def test_score_sari_needs_the_sources():
    src = ["About 95 species are currently accepted ."]
    assert score("20Minuten", ["About 95 you now get in ."], [PUBLISHED_REFS], sources=src) == 26.953601953601954
    with pytest.raises(ValueError, match="SARI needs sources"):
        score("20Minuten", ["x"], ["y"])


def test_score_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="1 predictions and 2 references"):
        score("FOMC", ["A"], ["A", "B"])
    with pytest.raises(ValueError, match="at least one"):
        score("FOMC", [], [])


# ---- continual-learning summaries ---------------------------------------------------------------------------

# R[i][j]: score on task j after training task i; R[0][2] was never evaluated.
R3 = [[80.0, 10.0, None],
      [70.0, 90.0, 20.0],
      [60.0, 85.0, 95.0]]


def test_overall_performance_is_the_mean_of_the_last_row():
    assert overall_performance(R3) == 80.0                  # (60 + 85 + 95) / 3


def test_backward_transfer_divides_by_t_minus_1_or_by_t_as_the_official_code():
    assert backward_transfer(R3) == -12.5                   # ((60 − 80) + (85 − 90)) / 2
    assert backward_transfer(R3, over_all_tasks=True) == pytest.approx(-25 / 3)
    assert backward_transfer([[42.0]]) == 0.0


def test_forward_transfer_against_the_base_models_zero_shot_scores():
    assert forward_transfer(R3, base=[5.0, 8.0, 15.0]) == 3.5   # ((10 − 8) + (20 − 15)) / 2
    with pytest.raises(ValueError, match="one zero-shot score per task"):
        forward_transfer(R3, base=[1.0, 2.0])


def test_missing_matrix_entries_are_named():
    broken = [row[:] for row in R3]
    broken[2][1] = None
    with pytest.raises(ValueError, match=r"R\[2\]\[1\] is missing; OP"):
        overall_performance(broken)
    broken = [row[:] for row in R3]
    broken[1][1] = None
    with pytest.raises(ValueError, match=r"R\[1\]\[1\] is missing; BWT"):
        backward_transfer(broken)
    broken[0][1] = None
    with pytest.raises(ValueError, match=r"R\[0\]\[1\] is missing; FWT"):
        forward_transfer(broken, base=[0.0, 0.0, 0.0])


def test_general_ability_reproduces_table_2():
    # Table 2: MMLU, GSM, BBH, TydiQA, BoolQ, PIQA of LLaMA-2-7B-Chat before and after SeqFT / SEEKR.
    names = ["MMLU", "GSM", "BBH", "TydiQA", "BoolQ", "PIQA"]
    base = dict(zip(names, [46.89, 27.14, 39.73, 16.76, 79.79, 76.33]))
    seqft = dict(zip(names, [45.16, 14.03, 32.50, 14.84, 79.00, 75.49]))
    seekr = dict(zip(names, [46.32, 20.85, 38.52, 18.22, 80.64, 75.79]))
    assert round(general_ability(base), 2) == 47.77
    assert (round(general_ability(seqft), 2), round(delta_general_ability(base, seqft), 2)) == (43.50, -4.27)
    assert (round(general_ability(seekr), 2), round(delta_general_ability(base, seekr), 2)) == (46.72, -1.05)
    with pytest.raises(ValueError, match="benchmarks differ"):
        delta_general_ability(base, {"MMLU": 1.0})


def test_format_matrix_aligns_rows_and_marks_missing_entries():
    table = format_matrix([[80.0, None], [70.5, 90.25]], ["FOMC", "task363"])
    assert table.splitlines() == [
        "                 FOMC task363",
        "after FOMC      80.00       -",
        "after task363   70.50   90.25",
    ]
