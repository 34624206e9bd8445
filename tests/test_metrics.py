"""Golden tests for prunekit.eval.metrics; every expected value is worked out by hand in the comments."""
import pytest

from prunekit.eval.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    EvalAIAnswerProcessor,
    gqa_exact_match,
    mean,
    mme_metrics,
    mme_parse,
    pope_metrics,
    pope_score,
    textvqa_accuracy,
)

approx = pytest.approx


# ----------------------------------------------------------------------------------------------- POPE

@pytest.mark.parametrize("pred, answer, expected", [
    ("Yes", "yes", 1.0),
    (" no \n", "no", 1.0),
    ("yes", " Yes ", 1.0),        # the answer is lower-cased and stripped too
    ("yes.", "yes", 0.0),         # no yes/no parsing: punctuation makes it wrong
    ("Yes, there is.", "yes", 0.0),
    ("no", "yes", 0.0),
])
def test_pope_score(pred, answer, expected):
    assert pope_score(pred, answer) == expected


def test_pope_metrics_golden():
    preds = ["Yes", " no ", "yes.", "maybe", "no", "yes", "NO", "yes"]
    gts = ["yes", "yes", "yes", "yes", "yes", "no", "no", "yes"]
    # normalised preds: yes, no, "yes.", maybe, no, yes, no, yes
    # correct at 0, 6, 7                          -> accuracy 3/8 = 0.375
    # TP (gt yes, pred yes): 0, 7 = 2; FP (gt no, pred yes): 5 = 1 -> precision 2/3
    # FN (gt yes, pred "no" exactly): 1, 4 = 2; "yes." and "maybe" (2, 3) are ignored -> recall 2/4 = 0.5
    # f1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    # yes_ratio = ground-truth yes 0, 1, 2, 3, 4, 7 = 6/8 = 0.75 (predicted yes would be 3/8)
    m = pope_metrics(preds, gts)
    assert m == {"accuracy": approx(0.375), "precision": approx(2 / 3), "recall": approx(0.5),
                 "f1": approx(4 / 7), "yes_ratio": approx(0.75)}


def test_pope_metrics_zero_denominators_give_zero():
    # no prediction is exactly "yes" or "no": TP = FP = FN = 0 -> precision = recall = f1 = 0
    m = pope_metrics(["yes.", "maybe", "No!"], ["yes", "no", "no"])
    assert m == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": approx(1 / 3)}


def test_pope_rejects_bad_input():
    with pytest.raises(ValueError):
        pope_metrics([], [])
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        pope_score("yes", "maybe")


# ------------------------------------------------------------------------------------------------ MME

def test_mme_category_names():
    assert MME_PERCEPTION == ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                              "landmark", "artwork", "OCR")
    assert MME_COGNITION == ("commonsense_reasoning", "numerical_calculation", "text_translation",
                             "code_reasoning")


@pytest.mark.parametrize("pred, expected", [
    ("Yes", "yes"),
    (" NO. ", "no"),
    ("y", "yes"),
    ("N.", "no"),            # "." dropped, then single letter n
    ("x", "other"),
    ("", "other"),
    ("...yes", "yes"),       # all dots removed -> "yes"
    ("Yes, there is a dog.", "yes"),
    ("Not really", "no"),    # "no" inside the first 4 chars "not "
    ("know", "no"),          # quirk: "know"[:4] contains "no"
    ("none", "no"),
    ("nope", "no"),
    ("I think yes", "other"),  # first 4 chars "i th"
    ("The answer is yes", "other"),
    ("noyes", "no"),         # prefix "noye" holds "no" but not "yes"
    ("yesno", "yes"),        # "yes" is tested before "no"
])
def test_mme_parse(pred, expected):
    assert mme_parse(pred) == expected


def _rec(qid, cat, pred, ans):
    return {"question_id": qid, "category": cat, "prediction": pred, "answer": ans}


def test_mme_metrics_golden_with_incomplete_image():
    records = [
        _rec("e1.jpg", "existence", "Yes", "Yes"),         # right
        _rec("e1.jpg", "existence", "No.", "No"),          # right  -> e1 pair both right
        _rec("e2.jpg", "existence", "yes, there is", "Yes"),  # right
        _rec("e2.jpg", "existence", "yes", "No"),          # wrong  -> e2 pair one wrong
        _rec("c1.png", "code_reasoning", "y", "yes"),      # right, but c1 has one record only
        _rec("c2.png", "code_reasoning", "Not at all", "no"),  # right ("not " -> no)
        _rec("c2.png", "code_reasoning", "maybe", "yes"),  # wrong ("other")
    ]
    m = mme_metrics(records)
    # existence: 3/4 questions right -> acc 75; 1 of 2 pairs both right -> acc_plus 50; score 125
    #   (lmms-eval: e1 100 + 100, e2 50 + 0 -> (200 + 50) / 2 = 125)
    # code_reasoning: 2/3 questions right -> acc 200/3; complete pairs: c2 only, not both right -> acc_plus 0
    #   score 200/3; c1 is reported incomplete
    assert m["categories"]["existence"] == {"acc": approx(75.0), "acc_plus": approx(50.0),
                                            "score": approx(125.0), "questions": 4, "images": 2}
    assert m["categories"]["code_reasoning"] == {"acc": approx(200 / 3), "acc_plus": approx(0.0),
                                                 "score": approx(200 / 3), "questions": 3, "images": 2}
    assert set(m["categories"]) == {"existence", "code_reasoning"}
    assert m["incomplete_images"] == ["c1.png"]
    assert m["perception"] == approx(125.0)
    assert m["cognition"] == approx(200 / 3)
    assert m["total"] == approx(125.0 + 200 / 3)  # 191.666...


def test_mme_metrics_complete_pairs_match_lmms_eval_formula():
    records = [
        _rec("a", "OCR", "yes", "yes"), _rec("a", "OCR", "no", "no"),        # 2/2 -> 100 + 100
        _rec("b", "OCR", "no", "yes"), _rec("b", "OCR", "no", "no"),         # 1/2 ->  50 +   0
        _rec("c", "OCR", "other", "yes"), _rec("c", "OCR", "yes", "no"),     # 0/2 ->   0 +   0
        _rec("d", "count", "Yes.", "yes"), _rec("d", "count", "n", "no"),    # 2/2 -> 200
        _rec("t", "text_translation", "no", "yes"), _rec("t", "text_translation", "no", "no"),  # 1/2 -> 50
    ]
    m = mme_metrics(records)
    # OCR: (200 + 50 + 0) / 3 = 83.33...; acc = 3/6 * 100 = 50; acc_plus = 1/3 * 100 = 33.33...
    assert m["categories"]["OCR"]["acc"] == approx(50.0)
    assert m["categories"]["OCR"]["acc_plus"] == approx(100 / 3)
    assert m["categories"]["OCR"]["score"] == 250 / 3  # lmms-eval arithmetic, exact
    # text_translation: 1/2 right -> acc 50, acc_plus 0 -> score 50
    # perception = OCR 250/3 + count 200; cognition = 50
    assert m["categories"]["text_translation"]["score"] == 50.0
    assert m["perception"] == approx(250 / 3 + 200)
    assert m["cognition"] == approx(50.0)
    assert m["total"] == approx(250 / 3 + 250)
    assert m["incomplete_images"] == []


def test_mme_rejects_bad_input():
    with pytest.raises(ValueError):
        mme_metrics([_rec("a", "not_a_category", "yes", "yes")])
    with pytest.raises(ValueError):
        mme_metrics([_rec("a", "OCR", "yes", "maybe")])


def test_mme_empty_is_zero():
    assert mme_metrics([]) == {"perception": 0, "cognition": 0, "total": 0, "categories": {},
                               "incomplete_images": []}


# ------------------------------------------------------------------------------------------------ GQA

@pytest.mark.parametrize("pred, answer, expected", [
    ("Yes", "yes", 1.0),
    ("yes.", "yes", 1.0),          # punctuation deleted
    ("Left!", "left", 1.0),
    ("T-shirt", "tshirt", 1.0),    # "-" deleted, not turned into a space
    ("T-shirt", "t shirt", 0.0),
    ("yes ", "yes", 0.0),          # whitespace is not stripped
    (" yes", "yes", 0.0),
    ("no", "yes", 0.0),
    ("yes\0", "yes", 1.0),         # numpy unicode arrays drop trailing NULs
])
def test_gqa_exact_match(pred, answer, expected):
    assert gqa_exact_match(pred, answer) == expected


# ------------------------------------------------------------------------------------- EvalAI / TextVQA

@pytest.mark.parametrize("raw, expected", [
    ("Dont", "don't"),             # contraction (after lower-casing)
    ("Im", "im"),                  # quirk: key "Im" is capitalised and never matches
    ("somebody'd", "somebodyd"),   # quirk of the table
    ("Two dogs", "2 dogs"),        # number map
    ("none", "0"),
    ("ten.", "10"),                # trailing period stripped, then number map
    ("The cat", "cat"),            # articles removed
    ("a an the", ""),
    ("1,000", "1000"),             # comma deleted up front
    ("red,blue", "redblue"),       # ... even between words
    ("Hello.", "hello"),
    ("3.5", "3.5"),                # period before a digit kept
    ("1.a", "1a"),                 # period not before a digit deleted
    ("man's hat", "man 's hat"),
    ("what?", "what"),
    ("yes!", "yes"),               # "!" -> space, then whitespace collapsed
    ("e-mail", "e mail"),          # no "- " or " -" in input -> replaced by a space
    ("a-b - c", "ab c"),           # " -" occurs -> every "-" deleted
    ("10:30", "10:30"),            # ":" is not in PUNCTUATIONS
    ("\tThe\nanswer  ", "answer"),
    ("." * 33, "."),               # re.UNICODE (32) passed as count: only 32 periods removed
])
def test_evalai_processor(raw, expected):
    assert EvalAIAnswerProcessor()(raw) == expected


def _answers(n_match):
    return ["two"] * n_match + ["three"] * (10 - n_match)


@pytest.mark.parametrize("n_match, expected", [
    (0, 0.0),
    # 1: the 9 subsets containing the match give 1/3, the one without it gives 0
    #    -> 9/10 * 1/3 = 0.3
    (1, 0.3),
    # 2: 8 subsets keep both matches (2/3), 2 subsets keep one (1/3) -> (8*2/3 + 2*1/3) / 10 = 6/10
    (2, 0.6),
    # 3: 7 subsets keep all 3 (1), 3 keep 2 (2/3) -> (7 + 2) / 10 = 0.9
    (3, 0.9),
    # 4: every subset keeps >= 3 matches -> 1
    (4, 1.0),
    (10, 1.0),
])
def test_textvqa_accuracy_leave_one_out(n_match, expected):
    # "2." normalises to "2" and every "two" answer to "2"
    assert textvqa_accuracy("2.", _answers(n_match)) == approx(expected)


def test_textvqa_normalises_prediction_and_answers():
    answers = ["The Coca-Cola", "coca cola", "coca cola", "Coca Cola.", "coke", "coke", "pepsi", "pepsi",
               "pepsi", "pepsi"]
    # "The Coca-Cola" -> "coca cola" ("-" becomes a space, article dropped); "Coca Cola." -> "coca cola"
    # prediction "Coca-Cola" -> "coca cola": 4 matches -> 1.0
    assert textvqa_accuracy("Coca-Cola", answers) == approx(1.0)
    # "coke!" -> "coke": 2 matches -> 0.6
    assert textvqa_accuracy("coke!", answers) == approx(0.6)
    with pytest.raises(ValueError):
        textvqa_accuracy("x", [])


def test_mean():
    assert mean([0.3, 0.6, 0.9]) == approx(0.6)
    with pytest.raises(ValueError):
        mean([])


@pytest.mark.parametrize("pred, answer, expected", [
    ("red", "red", 1.0), ("Red.", "red", 1.0), (" yes ", "yes", 1.0), ("3", "3", 1.0),
    ("red circle", "red", 0.0), ("no", "yes", 0.0), ("", "0", 0.0),
])
def test_pocket_score(pred, answer, expected):
    from prunekit.eval.metrics import pocket_score

    assert pocket_score(pred, answer) == expected


def test_pocket_metrics_are_accuracy_overall_and_per_question_type():
    from prunekit.eval.metrics import pocket_metrics

    records = [{"category": "existence", "score": 1.0}, {"category": "existence", "score": 0.0},
               {"category": "counting", "score": 1.0}, {"category": "spatial", "score": 0.0}]
    assert pocket_metrics(records) == {"accuracy": 0.5, "accuracy_counting": 1.0, "accuracy_existence": 0.5,
                                       "accuracy_spatial": 0.0}
