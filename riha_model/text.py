"""Report text: R2Gen's cleaning and threshold vocabulary, and sentence / phrase splitting for the text pyramid.

The cleaning reproduces R2Gen (Chen et al., EMNLP 2020, modules/tokenizers.py) character for character, quirks
included, so that vocabularies, lengths and scores are comparable with the literature built on it. The phrase
splitter is written here because the usual chunkers need downloaded models (nltk, spaCy) that a site may not have.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from riha_model.errors import RihaModelError

DATASETS = ("iu_xray", "mimic_cxr")
UNKNOWN = "<unk>"

# R2Gen's character class, written as R2Gen's non-raw string resolves: ':-\[' is the range ':'..'[' (so it also
# drops ; < = > ? @ and, were they still there, capitals).
_R2GEN_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
# R2Gen removes list numbering with plain string replacements, in this order.
_NUMBERING = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
              (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))


def _replace_repeatedly(text: str, old: str, new: str, times: int) -> str:
    """R2Gen chains the same str.replace a fixed number of times; so many passes, no more (no loop to a fixpoint)."""
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _clean_sentence(sentence: str) -> str:
    for quote_or_slash in ('"', "/", "\\", "'"):
        sentence = sentence.replace(quote_or_slash, "")
    return _R2GEN_PUNCT.sub("", sentence.strip().lower())


def clean_report(text: str, dataset: str = "iu_xray") -> str:
    """Lower-cased sentences without punctuation, joined by ' . ' and ended by ' .', exactly as R2Gen cleans them.

    Empty sentences are kept (R2Gen's filter compares a string with a list and so never drops one).
    """
    if dataset not in DATASETS:
        raise RihaModelError(f"Unknown report dataset {dataset!r}; use one of {', '.join(DATASETS)}.")
    if dataset == "mimic_cxr":
        text = text.replace("\n", " ")
        text = _replace_repeatedly(text, "__", "_", 7)
        text = _replace_repeatedly(text, "  ", " ", 6)
        text = _replace_repeatedly(text, "..", ".", 8)
    else:
        text = _replace_repeatedly(text, "..", ".", 3)
    for old, new in _NUMBERING:
        text = text.replace(old, new)
    sentences = text.strip().lower().split(". ")
    return " . ".join(_clean_sentence(sentence) for sentence in sentences) + " ."


class Tokenizer:
    """R2Gen's word vocabulary: tokens seen at least `threshold` times in the cleaned training reports.

    Ids: 0 is padding, begin and end of sequence; the sorted tokens (with '<unk>') are 1..N.
    """

    def __init__(self, tokens: Sequence[str], dataset: str = "iu_xray", threshold: int | None = None):
        if dataset not in DATASETS:
            raise RihaModelError(f"Unknown report dataset {dataset!r}; use one of {', '.join(DATASETS)}.")
        if UNKNOWN not in tokens:
            raise RihaModelError(f"The vocabulary has no {UNKNOWN!r} token; rebuild it with Tokenizer.build.")
        if len(set(tokens)) != len(tokens):
            raise RihaModelError("The vocabulary lists a token twice; rebuild it with Tokenizer.build.")
        self.dataset = dataset
        self.threshold = threshold
        self.idx2token = {idx: token for idx, token in enumerate(sorted(tokens), start=1)}
        self.token2idx = {token: idx for idx, token in self.idx2token.items()}

    @classmethod
    def build(cls, reports: Iterable[str], threshold: int, dataset: str = "iu_xray") -> Tokenizer:
        """Count the tokens of the cleaned reports (the training split) and keep those at or above threshold."""
        counts = Counter(token for report in reports for token in clean_report(report, dataset).split())
        kept = [token for token, count in counts.items() if count >= threshold and token != UNKNOWN]
        return cls(kept + [UNKNOWN], dataset=dataset, threshold=threshold)

    @property
    def vocab_size(self) -> int:
        """Size of the output layer: the N tokens plus id 0."""
        return len(self.token2idx) + 1

    def token_id(self, token: str) -> int:
        return self.token2idx.get(token, self.token2idx[UNKNOWN])

    def encode(self, report: str, max_length: int | None = None) -> list[int]:
        """[0] + ids of the cleaned report + [0]; with max_length, cut to that many ids as R2Gen's dataset does
        (a cut sequence loses its closing 0)."""
        ids = [0] + [self.token_id(token) for token in clean_report(report, self.dataset).split()] + [0]
        return ids if max_length is None else ids[:max_length]

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens up to the first 0, joined by spaces (pass generated ids, which carry no leading 0)."""
        words = []
        for idx in ids:
            idx = int(idx)
            if idx == 0:
                break
            if idx not in self.idx2token:
                raise RihaModelError(f"Token id {idx} is outside this vocabulary of {self.vocab_size} ids; "
                                     "decode with the tokenizer stored in the same checkpoint.")
            words.append(self.idx2token[idx])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "threshold": self.threshold,
                "tokens": [self.idx2token[idx] for idx in range(1, len(self.idx2token) + 1)]}

    @classmethod
    def from_dict(cls, data: dict) -> Tokenizer:
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise RihaModelError("The stored vocabulary has no 'tokens' list; the checkpoint is damaged or too old.")
        return cls(data["tokens"], dataset=data.get("dataset", "iu_xray"), threshold=data.get("threshold"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s+\.(?:\s+|$)|\n+")


def split_sentences(report: str) -> list[str]:
    """Sentences of a raw or a cleaned report (cleaned ones are separated by ' . '), without their full stops."""
    sentences = (part.strip().rstrip(".!?").strip() for part in _SENTENCE_END.split(report))
    return [sentence for sentence in sentences if sentence]


# Words that end a noun phrase in report language: articles, pronouns, prepositions, conjunctions, negations,
# auxiliaries and the verbs reports use to say that something is (not) seen. Everything else is taken as part of
# a noun phrase (nouns, adjectives, numbers), which is what radiology sentences are mostly made of.
_PHRASE_BREAKS = frozenset("""
a an the this that these those there here it its they them their which who whom whose what when where while
of in on at to from for with within without by about above below over under between into onto upon along across
around behind beyond near via per than as since after before during through throughout toward towards
and or but nor yet so also either neither both not no nor none nothing any
is are was were be been being am has have had having do does did will would shall should can could may might must
seen noted identified demonstrated visualized visible evident present appear appears appeared appearing
seems seem remain remains remained unchanged stable shows show showing shown demonstrates demonstrate
suggest suggests suggesting suggestive consistent compatible likely unlikely possibly probably again
otherwise overall now still well very mildly minimally slightly essentially grossly relatively
specifically evidence definite definitive xxxx
""".split())
_WORD = re.compile(r"[a-z0-9][a-z0-9\-]*")


def split_phrases(sentence: str) -> list[str]:
    """Noun phrases / clinical terms of one sentence: maximal runs of words between function words and verbs.

    "no pneumothorax or pleural effusion is seen" -> ["pneumothorax", "pleural effusion"].
    """
    phrases, current = [], []
    for word in _WORD.findall(sentence.lower()):
        if word in _PHRASE_BREAKS:
            if current:
                phrases.append(" ".join(current))
            current = []
        else:
            current.append(word)
    if current:
        phrases.append(" ".join(current))
    return phrases
