"""POPE, MME, GQA, TextVQA, MUIRBench and Video-MME metrics, reproducing lmms-eval (EvolvingLMMs-Lab/lmms-eval)
exactly.

Pure Python (stdlib only). Sources read; paths are under ``lmms_eval/``, and line numbers refer to the
commit named:

* POPE: ``tasks/pope/utils.py`` @2c03baf0: ``pope_process_results`` (15-26), ``pope_aggregate_accuracy`` (29-34),
  ``_precision`` (37-48), ``_recall`` (51-62), ``_f1_score`` (65-69), ``_yes_ratio`` (72-82).
* MME: ``tasks/mme/utils.py`` @306a8b48: ``eval_type_dict`` (12-31), ``parse_pred_ans`` (52-73),
  ``mme_process_results`` (76-94), ``mme_aggregate_results`` (97-126).
* GQA: ``tasks/gqa/gqa.yaml`` (``exact_match`` with ``ignore_case`` and ``ignore_punctuation``) and
  ``api/metrics.py`` @309242ce: ``exact_match_hf_evaluate`` (numpy port of HF ``evaluate`` exact_match).
* TextVQA: ``tasks/textvqa/utils.py`` @e39bd931: ``textvqa_process_results`` (19-44), and
  ``tasks/_task_utils/vqa_eval_metric.py`` @61e5060b: ``EvalAIAnswerProcessor`` (4-213; a copy of mmf's):
  CONTRACTIONS (11-132), PERIOD_STRIP (149), ``word_tokenize`` (178-181), ``process_punctuation`` (183-191).
* Video-MME: lmms-eval 0.7.3 (the pinned release), ``tasks/videomme/utils.py``: ``extract_characters_regex`` (256-259)
  calls ``tasks/_task_utils/mcq_extract.py``'s ``extract_mcq_answer`` (65-): the letter read by a ranked search over
  answer formats; ``videomme_process_results`` (271-): the letter compared ignoring case. (Up to v0.7.1 the extractor
  was a regex for the first capital A-D after deleting answer prefixes; it reads "Best answer: C" as B.)

Where lmms-eval would crash (an ``assert``, a ZeroDivisionError) we raise ``ValueError``. The one deliberate
divergence is MME pairs: see ``mme_metrics``.
"""

import re
import statistics
import string
from collections import defaultdict

__all__ = [
    "EvalAIAnswerProcessor",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "gqa_exact_match",
    "mean",
    "mme_metrics",
    "mme_parse",
    "pocket_metrics",
    "pocket_score",
    "pope_metrics",
    "pope_score",
    "textvqa_accuracy",
    "videomme_extract",
    "videomme_metrics",
    "videomme_score",
]


def mean(xs):
    """lmms-eval's ``mean`` aggregation (api/metrics.py): ``sum(arr) / len(arr)``."""
    xs = list(xs)
    if not xs:
        raise ValueError("mean of no values")
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------- POPE


def _yes_no(answer, task):
    gt = answer.lower().strip()
    if gt not in ("yes", "no"):  # lmms-eval asserts this
        raise ValueError(f"{task} ground truth must be yes/no, got {answer!r}")
    return gt


def pope_score(prediction: str, answer: str) -> float:
    """1.0 iff the lower-cased, stripped prediction equals the answer: "yes." or "Yes, it is" score 0."""
    return 1.0 if prediction.lower().strip() == _yes_no(answer, "POPE") else 0.0


def pope_metrics(predictions: list[str], answers: list[str]) -> dict:
    """accuracy, precision, recall, f1 ("yes" is positive) and the ground-truth yes_ratio, as fractions.

    Kept quirks: a prediction other than exactly "yes"/"no" is neither a positive nor a negative, so on a
    "yes" sample it lowers accuracy but NOT recall (recall only counts pred == "no" as a false negative).
    A zero denominator gives 0 (lmms-eval returns int 0; we return 0.0). ``yes_ratio`` is the share of
    ground-truth "yes", not of predicted "yes".
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not predictions:
        raise ValueError("POPE metrics of no samples")  # lmms-eval: ZeroDivisionError in accuracy
    preds = [p.lower().strip() for p in predictions]
    gts = [_yes_no(a, "POPE") for a in answers]
    tp = sum(g == "yes" and p == "yes" for p, g in zip(preds, gts))
    fp = sum(g == "no" and p == "yes" for p, g in zip(preds, gts))
    fn = sum(g == "yes" and p == "no" for p, g in zip(preds, gts))
    n_yes = gts.count("yes")
    accuracy = sum(1.0 if p == g else 0.0 for p, g in zip(preds, gts)) / len(gts)
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0.0
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": n_yes / len(gts)}


# --------------------------------------------------------------------------- MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(prediction: str) -> str:
    """Otter's ``parse_pred_ans``: "yes" | "no" | "other".

    Kept quirks: every "." is removed (so "y." is "yes"); "yes"/"no" anywhere in the first 4 characters
    wins, "yes" first, so "not sure", "none" and even "know" parse as "no"; "" is "other".
    """
    pred = prediction.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_metrics(records: list[dict]) -> dict:
    """MME perception / cognition scores (max 2000 / 800) with per-category acc and acc_plus.

    records: dicts with question_id, category, prediction, answer. Per category lmms-eval groups by
    question_id (one image, two questions) and averages acc + acc_plus over images, acc being the share
    of the pair answered right ×100 and acc_plus 100 iff both are. Divergence: lmms-eval asserts every
    group has exactly 2 records; we keep groups of another size in ``acc`` (a per-question mean), leave
    them out of ``acc_plus`` and list their question_ids in ``incomplete_images``. With only complete
    pairs the numbers equal lmms-eval's, to the bit. Categories are summed in order of first appearance,
    as lmms-eval does; an unknown category raises (lmms-eval would silently add it to cognition).
    """
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    groups = defaultdict(dict)  # category -> question_id -> [score, ...], insertion-ordered
    for r in records:
        category = r["category"]
        if category not in known:
            raise ValueError(f"unknown MME category {category!r}")
        gt = r["answer"].lower().strip().replace(".", "")  # MME also drops "." from the answer
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {r['answer']!r}")
        score = 1.0 if mme_parse(r["prediction"]) == gt else 0.0
        groups[category].setdefault(r["question_id"], []).append(score)

    categories, incomplete = {}, []
    for category, by_image in groups.items():
        pairs = [s for s in by_image.values() if len(s) == 2]
        incomplete += [qid for qid, s in by_image.items() if len(s) != 2]
        scores = [x for s in by_image.values() for x in s]
        acc = sum(scores) / len(scores) * 100.0
        acc_plus = sum((sum(s) == 2) * 100.0 for s in pairs) / len(pairs) if pairs else 0.0
        if len(pairs) == len(by_image):
            # lmms-eval's exact arithmetic: mean over images of (acc_i + acc_plus_i)
            score = sum(sum(s) / len(s) * 100.0 + (sum(s) == 2) * 100.0 for s in pairs) / len(pairs)
        else:
            score = acc + acc_plus
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": score,
                                "questions": len(scores), "images": len(by_image)}

    # lmms-eval: sum(category2avg_score.values()) per aggregate, categories in first-seen order
    perception = sum(c["score"] for k, c in categories.items() if k in MME_PERCEPTION)
    cognition = sum(c["score"] for k, c in categories.items() if k in MME_COGNITION)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "categories": categories, "incomplete_images": incomplete}


# --------------------------------------------------------------------------- GQA

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def gqa_exact_match(prediction: str, answer: str) -> float:
    """``exact_match`` with ignore_case + ignore_punctuation: lower(), delete string.punctuation, compare.

    Not regex-based: ``str.translate`` deletes the 32 ASCII punctuation characters ("T-shirt" -> "tshirt").
    Whitespace is NOT stripped ("yes " != "yes"). lmms-eval does this on numpy unicode arrays, which
    silently drop trailing NUL characters; the ``rstrip("\\0")`` reproduces that.
    """
    pred = prediction.rstrip("\0").lower().translate(_PUNCT_TABLE).rstrip("\0")
    ref = answer.rstrip("\0").lower().translate(_PUNCT_TABLE).rstrip("\0")
    return 1.0 if pred == ref else 0.0


# --------------------------------------------------------------------------- TextVQA


class EvalAIAnswerProcessor:
    """Faithful port of lmms-eval's ``EvalAIAnswerProcessor`` (from mmf), quirks included:

    * every "," and "?" is deleted up front, so "1,000" -> "1000" but also "red,blue" -> "redblue";
      that also makes the COMMA_STRIP test in ``process_punctuation`` unreachable in practice;
    * "'s" becomes " 's" ("man's" -> "man 's");
    * a listed punctuation mark is deleted everywhere if it appears next to a space anywhere in the input,
      otherwise replaced by a space everywhere ("a-b - c" -> "ab c", "a-b" -> "a b");
    * PERIOD_STRIP's ``(?!<=\\d)`` is a typo'd look-behind and never fires, so it deletes every "." not
      followed by a digit ("1.a" -> "1a", "3.5" kept), and ``sub`` gets ``re.UNICODE`` (32) as its *count*,
      so at most 32 periods are removed;
    * the contraction keys with capitals ("Im", "Ive", "Id've", "I'dve") never match (input is lower-cased),
      and "somebody'd" maps to "somebodyd";
    * ":", "'", "#", "$", "%", "&", "*", "|", "~", "^" are not in PUNCTUATIONS and are kept.
    (lmms-eval's ``NUMBER_MAP.setdefault`` also grows the class dict with every word seen; mapping is
    unaffected, so we use ``get``.)
    """

    CONTRACTIONS = {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
        "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
        "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
        "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
        "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
        "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
        "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
        "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
        "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
        "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
        "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
        "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
        "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
        "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
        "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
        "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
        "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
        "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
        "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
        "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
        "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
        "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
        "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
        "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
        "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
        "youll": "you'll", "youre": "you're", "youve": "you've",
    }
    NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    ARTICLES = ["a", "an", "the"]
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]

    def word_tokenize(self, word):
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in self.PUNCTUATIONS:
            # the test looks at in_text (the original), the edit is applied to out_text
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.COMMA_STRIP, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return self.PERIOD_STRIP.sub("", out_text, count=re.UNICODE)  # lmms-eval passes re.UNICODE as count

    def process_digit_article(self, in_text):
        out_text = []
        for word in in_text.lower().split():
            word = self.NUMBER_MAP.get(word, word)
            if word not in self.ARTICLES:
                out_text.append(word)
        return " ".join(self.CONTRACTIONS.get(word, word) for word in out_text)

    def __call__(self, item):
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        return self.process_digit_article(item)


_EVALAI = EvalAIAnswerProcessor()


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: mean over leave-one-out subsets of the answers of min(1, matches / 3), after EvalAI
    normalisation of the prediction and every answer (always, unlike the official VQA script, which
    normalises answers only when they disagree). ``statistics.mean`` as in lmms-eval (exact summation)."""
    if not answers:
        raise ValueError("TextVQA accuracy needs at least one answer")  # lmms-eval: StatisticsError
    pred = _EVALAI(prediction)
    gts = [_EVALAI(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        accs.append(min(1, float(matching) / 3))
    return float(statistics.mean(accs))


# --------------------------------------------------------------------------- pocket (prunekit's own, docs/pocket.md)


def pocket_score(prediction: str, answer: str) -> float:
    """1.0 iff the prediction is the one-word answer, ignoring case, surrounding space and punctuation."""
    return 1.0 if prediction.lower().translate(_PUNCT_TABLE).strip() == answer.lower().strip() else 0.0


def muirbench_score(prediction: str, answer: str) -> float:
    """lmms-eval's MUIRBench: the letter of a response that opens with ``X.``, else the response, equal to the answer
    letter ignoring case and surrounding space."""
    match = re.match(r"^\s*([A-Z])\.", prediction)
    return float((match.group(1) if match else prediction).lower().strip() == answer.lower().strip())


def pocket_metrics(records: list[dict]) -> dict:
    """``accuracy`` over every question, and ``accuracy_<type>`` per question type (the category column)."""
    return accuracy_by_category(records)


def accuracy_by_category(records: list[dict], key: str = "category", prefix: str = "accuracy_") -> dict:
    """``accuracy`` over every record, and ``<prefix><value>`` per value of ``key`` (pocket: question type; MUIRBench
    and Video-MME: task)."""
    out = {"accuracy": mean(r["score"] for r in records)}
    for kind in sorted({str(r[key]) for r in records if r.get(key)}):
        out[f"{prefix}{kind}"] = mean(r["score"] for r in records if r.get(key) is not None and str(r[key]) == kind)
    return out


# --------------------------------------------------------------------------- Video-MME

# extract_mcq_answer's answer phrases (the letter after one counts) and its formats, most confident first
_MCQ_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
                "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
                "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                 "space": 2, "fallback": 0}


def videomme_extract(prediction: str, choices: str = "ABCD") -> str:
    """lmms-eval 0.7.3's ``extract_mcq_answer``: every place a choice letter appears in a known format is a candidate
    (a leading standalone letter, a trailing one, after an answer phrase, ``(B)``, ``B.``, ``B:``, ``B)``, ``B `` ),
    the most confident format wins and, within it, the last place; any capital letter only when nothing matched;
    "" when there is none. Case-sensitive: "b" gives ""."""
    if not prediction or not prediction.strip():
        return ""
    text = prediction.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    found = []  # (letter, position, format)
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):
        found += [(c, text.rfind(pattern.format(c)), fmt) for c in choices if pattern.format(c) in text]
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            found += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices
                      if text.find(c, at + len(phrase)) != -1]
    core = text.strip()
    found += [(c, 0, "start") for c in choices if core.startswith(c) and (len(core) == 1 or not core[1].isalpha())]
    found += [(c, len(text) - 1, "end") for c in choices if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha())]
    if not found:
        found = [(c, text.rfind(c), "fallback") for c in choices if c in text]
    if not found:
        return ""
    return max(found, key=lambda f: (_MCQ_PRIORITY[f[2]], f[1]))[0]


def videomme_score(prediction: str, answer: str) -> float:
    """1.0 iff the extracted letter equals the answer letter, ignoring case (``videomme_process_results``)."""
    return 1.0 if videomme_extract(prediction).lower() == answer.lower() else 0.0


def videomme_metrics(records: list[dict]) -> dict:
    """``accuracy`` overall (lmms-eval's ``videomme_perception_score``, as a fraction), ``accuracy_<task type>``,
    ``accuracy_duration_<short|medium|long>`` and ``accuracy_domain_<domain>`` (the breakdowns lmms-eval logs).
    records: dicts with ``score``, ``category`` (the task type), ``duration`` and ``domain``."""
    return (accuracy_by_category(records) | accuracy_by_category(records, "duration", "accuracy_duration_")
            | accuracy_by_category(records, "domain", "accuracy_domain_"))
