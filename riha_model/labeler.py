"""A rule-based labeler for the 14 CheXpert observations that runs offline.

It follows the CheXpert labeler (Irvin et al., AAAI 2019) in what it decides -- mention phrases per observation, a
negation or uncertainty verdict per mention, the same rules for conflicting mentions and for "No Finding" -- but finds
the scope of a negation or a hedge with NegEx-style trigger words instead of a dependency parse, because a parser
needs downloaded models. Heart and mediastinum are judged by what a sentence says about them ("heart size is normal",
"the heart is enlarged"), not by the bare mention; "stable" alone says nothing of size and is not a finding.
Written by hand: no maintained library labels CheXpert observations without a parser model or a network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
_OTHER = "other"  # abnormalities outside the 14 that still rule out "No Finding" (CheXpert's no_finding list)

# Mention phrases (regular expressions, matched from a word start). "weak" ones are hedges by nature: a positive
# mention counts as uncertain (CheXpert does so for congestion, indistinctness and blunted angles).
_MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (r"widen\w* (?:of the )?(?:superior )?mediastin\w*", r"mediastinal widening",
                                   r"enlarged cardiomediastinum", r"mediastinal (?:mass|shift|enlargement)"),
    "Cardiomegaly": (r"cardiomegaly", r"cardiac enlargement", r"enlarge\w* (?:of the )?(?:heart|cardiac)\b",
                     r"enlarged heart", r"cardiomyopathy"),
    "Lung Lesion": (r"mass(?:es)?\b", r"nodul(?:e|es|ar densit\w*|ar opacit\w*|ar opacification)\b", r"lump",
                    r"cavitary lesion", r"carcinoma", r"neoplasm", r"tumou?r", r"lesions?\b"),
    "Lung Opacity": (r"opaci\w*", r"decreased translucency", r"increased densit\w*", r"densit(?:y|ies)\b",
                     r"air[- ]?space (?:disease|process)", r"infiltrat\w*", r"interstitial (?:marking|pattern|lung)",
                     r"reticular (?:pattern|marking)", r"reticulation", r"parenchymal scar\w*",
                     r"peribronchial thickening", r"wall thickening", r"scar\w*"),
    "Edema": (r"edema", r"heart failure", r"chf\b", r"fluid overload"),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (r"pneumonia", r"bronchopneumonia", r"infection", r"infectious", r"pneumonitis"),
    "Atelectasis": (r"atelecta\w*", r"collapse\w*"),
    "Pneumothorax": (r"pneumothora(?:x|ces|xes)", r"hydropneumothorax", r"pleural air(?: collection)?"),
    "Pleural Effusion": (r"pleural fluid", r"effusions?\b", r"hydrothorax", r"hydropneumothorax"),
    "Pleural Other": (r"pleural (?:thickening|fibrosis|plaques?|calcification)", r"fibrothorax",
                      r"pleural (?:parenchymal )?scar\w*", r"pleuro-?(?:parenchymal|pericardial) scar\w*",
                      r"apical (?:pleural )?(?:thickening|capping|cap)\b"),
    "Fracture": (r"fractur\w*", r"fx\b"),
    "Support Devices": (r"pacer", r"pacemaker", r"line\b", r"lines\b", r"picc", r"tubes?\b", r"valve", r"catheter\w*",
                        r"hardware", r"arthroplast\w*", r"icd\b", r"defib\w*", r"devices?\b", r"drains?\b",
                        r"plates?\b", r"screws?\b", r"cannula", r"apparatus", r"coils?\b", r"port\b",
                        r"port-a-cath", r"mediport", r"stents?\b", r"leads?\b", r"wires?\b", r"prosthe\w*"),
    _OTHER: (r"emphysema\w*", r"bullae", r"bullous", r"copd\b", r"chronic obstructive", r"hyperinflat\w*",
             r"hyperexpan\w*", r"hyperaerat\w*", r"overinflat\w*", r"hyperlucen\w*", r"flatten\w*",
             r"low lung volumes?", r"hypoinflat\w*", r"hypoexpan\w*", r"diminished lung volumes?",
             r"decreased lung volumes?", r"volume loss", r"elevat\w*", r"eventration", r"scoliosis", r"kyphosis",
             r"degenerat\w*", r"spondylosis", r"osteophyt\w*", r"calcifi\w*", r"granulom\w*", r"atheroscl\w*",
             r"tortuous\w*", r"tortuosity", r"ectasia", r"ectatic", r"aneurysm\w*", r"dilat\w*", r"hernia",
             r"bronchospasm", r"asthma", r"bronchitis", r"bronchiectasis", r"bronchiolitis",
             r"airways? disease", r"cuffing", r"thickening", r"cephalization", r"aspiration", r"contusion",
             r"osteopenia", r"demineraliz\w*", r"metasta\w*", r"pneumomediastinum", r"pneumoperitoneum",
             r"free air", r"inflam\w*", r"hypertension", r"prominen\w*", r"deformit\w*", r"hemorrhage",
             r"hematoma", r"lucenc\w*", r"fibrosis", r"fibrotic", r"sternotomy", r"cabg", r"clips?\b",
             r"post-?surgical", r"post-?operative", r"adenopathy", r"lymphadenopathy"),
}
_WEAK_MENTIONS: dict[str, tuple[str, ...]] = {
    "Edema": (r"(?:vascular|pulmonary|venous) congestion", r"indistinct\w*", r"vascular prominence",
              r"prominen\w* (?:of the )?(?:pulmonary )?vascula\w*"),
    "Pleural Effusion": (r"blunt\w* (?:of )?(?:the )?(?:(?:right|left|bilateral) )?(?:costophrenic|cp)",
                         r"(?:costophrenic|cp) (?:\w+ ){0,2}blunt\w*"),
}
# Mentions that contain a phrase above but mean something else.
_NOT_MENTIONS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": (r"pericardial effusion", r"joint effusion", r"(?:knee|elbow|suprapatellar) effusion"),
    "Lung Lesion": (r"calcified (?:nodul\w*|lesion\w*|mass)", r"massive", r"soft tissue mass", r"mass effect",
                    r"nipple", r"bone lesion\w*", r"lytic lesion\w*", r"sclerotic lesion\w*", r"skin lesion\w*"),
    "Lung Opacity": (r"pleural (?:parenchymal )?scar\w*", r"nodular densit\w*",
                     r"nodular opacit\w*", r"densit\w* (?:of|in) the (?:spine|bones?)", r"bone densit\w*"),
    "Atelectasis": (r"(?:vertebral|vertebra|compression|body|spine|spinal) (?:body )?collapse\w*",),
    "Pneumonia": (r"(?:granulomatous|prior|old|previous|remote|healed|past) (?:\w+ )?infection\w*",),
    "Support Devices": (r"(?:septal|kerley\w*|kerley b|pleural) lines?", r"midline", r"lines? of (?:the )?\w+",
                        r"(?:paraspinal|paratracheal|azygoesophageal|junction|fissure|fissural|skin) lines?",
                        r"tube shaped"),
}

# Heart and mediastinum: a sentence says what they are. Anatomy words, and what is said of them.
_ANATOMY: dict[str, str] = {
    "Cardiomegaly": r"heart(?: size| silhouette| shadow)?|cardiac(?: silhouette| size| shadow| contours?| borders?)?",
    "Enlarged Cardiomediastinum": r"cardiomediastinal(?: silhouettes?| contours?| structures)?|cardiomediastinum|"
                                  r"mediastin(?:um|al)(?: silhouettes?| contours?| structures)?",
}
_STATE_BORDERLINE = r"borderline(?: (?:enlarged|enlargement|cardiomegaly|in size|size|large))?|prominen\w*|mildly large"
# "at the upper limits of normal" is normal, as CheXpert's negation rules have it.
_STATE_NORMAL = (r"(?:at |within |near |on )?(?:the )?(?:upper|first|high) (?:limits?|range|end|levels?)(?: of)? normal"
                 r"(?: size| limits)?|(?:upper|top|high)[- ]normal(?: in size| size| limits)?|"
                 r"within (?:the )?(?:normal limits|limits of normal|normal range|normal size)|normal(?: in size)?|"
                 r"unremarkable|wnl|not (?:significantly )?enlarged|no (?:longer )?enlarged")
_STATE_ABNORMAL = (r"(?:mildly |moderately |markedly |severely |massively )?"
                   r"(?:enlarge\w*|large|larger|increased?|widen\w*|dilat\w*)")

# NegEx-style triggers and scope ends.
_SCOPE_WORDS = 10
_PRE_BOUNDARY = re.compile(r"\b(?:but|however|although|though|whereas|while|except|aside from|apart from|"
                           r"other than|which|who|with|is|are|was|were|has|have|had|appears?|remains?|seen|noted|"
                           r"identified)\b|[;:()]")
_POST_BOUNDARY = re.compile(r"\b(?:but|however|although|though|whereas|while|except|which|there|with)\b|[;:()]")
_PRE_NEGATION_UNCERTAIN = re.compile(
    r"\b(?:(?:cannot|can not|could not|unable to|difficult to|not) (?:be )?(?:entirely |completely |totally )?"
    r"(?:exclude|excluded|rule out|ruled out)|no new|not excluded)\b")
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|resolved|removal of|"
    r"rather than|rule out|ruled out|exclude|excluded|never|nor|neither|negative|history of)\b")
_PRE_UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|probable|probably|questionabl[ey]|question of|suspect\w*|suspicious|suspicion|"
    r"concern\w*|worrisome|suggest\w*|may|might|could|can|would|versus|vs|equivocal|indeterminate|presum\w*|"
    r"perhaps|differential|borderline|uncertain|cannot|either|and/or|evaluat\w* for|assess\w* for)\b")
# "no change in X" and the like speak of an X that is there.
_PSEUDO_NEGATION = re.compile(r"\bno (?:significant |interval |definite |substantial )?"
                              r"(?:change|increase|decrease|worsening|improvement|progression)\w* (?:in|of)\b")
_POST_NEGATION = re.compile(
    r"\b(?:not (?:been )?(?:seen|identified|visualized|present|noted|demonstrated|evident|appreciated|detected|"
    r"shown|visible)|no longer|(?:has|have) (?:since )?(?:resolved|cleared)|resolved|absent|removed)\b")
_POST_NEGATION_UNCERTAIN = re.compile(
    r"\b(?:(?:cannot|can not|could not|not) (?:be )?(?:entirely |completely |totally )?(?:excluded|ruled out))\b")
_POST_UNCERTAIN = re.compile(
    r"\b(?:(?:is|are) (?:questioned|possible|not (?:well|clearly) (?:seen|visualized|evaluated))|suspected|"
    r"(?:poorly|incompletely) (?:evaluated|visualized|assessed)|obscured|versus|vs|and/or)\b|\?")
_ALTERNATIVE = re.compile(r"^\W*(?:or|versus|vs)\b|\b(?:or|versus|vs)\W*$")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+|\.(?=[A-Za-z])|\s(?=\d\.\s)")


def _union(phrases: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(phrases) + r")")


_MENTION_RES = {name: _union(phrases) for name, phrases in _MENTIONS.items()}
_WEAK_RES = {name: _union(phrases) for name, phrases in _WEAK_MENTIONS.items()}
_NOT_MENTION_RES = {name: _union(phrases) for name, phrases in _NOT_MENTIONS.items()}
_ANATOMY_RES = {name: re.compile(r"\b(?:" + pattern + r")\b") for name, pattern in _ANATOMY.items()}
_STATE_RE = re.compile(rf"\b(?:(?P<borderline>{_STATE_BORDERLINE})|(?P<normal>{_STATE_NORMAL})|"
                       rf"(?P<abnormal>{_STATE_ABNORMAL}))\b")


@dataclass(frozen=True)
class _Span:
    name: str
    start: int
    end: int


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9/?]+(?:['-][a-z0-9]+)*", text)


def _pre_scope(sentence: str, start: int, floor: int = 0) -> str:
    text = sentence[floor:start]
    boundaries = list(_PRE_BOUNDARY.finditer(text))
    if boundaries:
        text = text[boundaries[-1].end():]
    return " ".join(_words(text)[-_SCOPE_WORDS:])


def _post_scope(sentence: str, end: int) -> str:
    text = sentence[end:]
    boundary = _POST_BOUNDARY.search(text)
    if boundary:
        text = text[:boundary.start()]
    return " ".join(_words(text)[:_SCOPE_WORDS])


def _verdict(sentence: str, span: _Span, floor: int = 0) -> int:
    """CheXpert's order: hedged negations ("cannot exclude"), then negation, then uncertainty, else positive."""
    before, after = _pre_scope(sentence, span.start, floor), _post_scope(sentence, span.end)
    before = _PSEUDO_NEGATION.sub(" ", before)
    if _PRE_NEGATION_UNCERTAIN.search(before) or _POST_NEGATION_UNCERTAIN.search(after):
        return UNCERTAIN
    if _PRE_NEGATION.search(before) or _POST_NEGATION.search(after):
        return NEGATIVE
    if _PRE_UNCERTAIN.search(before) or _POST_UNCERTAIN.search(after) or _ALTERNATIVE.search(before[-12:] + " ") \
            or _ALTERNATIVE.search(" " + after[:12]):
        return UNCERTAIN
    return POSITIVE


def _overlaps(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    return any(start < span[1] and span[0] < end for start, end in others)


def _mentions(sentence: str) -> list[tuple[_Span, bool]]:
    """(span, weak) for every observation phrase in the sentence, minus the look-alikes."""
    found = []
    for name, pattern in _MENTION_RES.items():
        excluded = [m.span() for m in _NOT_MENTION_RES[name].finditer(sentence)] if name in _NOT_MENTION_RES else []
        weak = [m.span() for m in _WEAK_RES[name].finditer(sentence)] if name in _WEAK_RES else []
        for match in pattern.finditer(sentence):
            if not _overlaps(match.span(), excluded + weak):
                found.append((_Span(name, *match.span()), False))
        found += [(_Span(name, start, end), True) for start, end in weak if not _overlaps((start, end), excluded)]
    return found


# Words that may follow a state word said of a subject ("the heart is enlarged in size", "... normal and ...");
# any other word after it means the state describes that word instead ("enlarged pulmonary arteries").
_PREDICATIVE_FOLLOWERS = frozenset("""
and or but in for with without since than compared when on at from to by as given although however which today
again there no size contour contours configuration appearance limits limit stable unchanged allowing accounting
""".split())


def _attributive(sentence: str, end: int) -> bool:
    rest = sentence[end:].lstrip()
    following = _words(rest[:40])
    return bool(rest) and rest[0].isalnum() and bool(following) and following[0] not in _PREDICATIVE_FOLLOWERS


def _anatomy_states(sentence: str) -> list[tuple[str, int]]:
    """(observation, label) for what the sentence says of the heart and the mediastinum.

    A state word ("normal", "enlarged", "upper limits of normal") said of a subject belongs to the anatomy words
    just before it that no earlier state took ("the heart and mediastinum are normal"); one placed before a noun
    belongs to the anatomy words right after it ("normal heart size") and to nothing when that noun is something
    else ("enlarged pulmonary arteries").
    """
    anatomy = sorted((m.start(), m.end(), name) for name, pattern in _ANATOMY_RES.items()
                     for m in pattern.finditer(sentence))
    states = list(_STATE_RE.finditer(sentence))
    taken: set[int] = set()
    results = []
    previous_end = 0
    for index, state in enumerate(states):
        next_start = states[index + 1].start() if index + 1 < len(states) else len(sentence)
        before = [i for i, a in enumerate(anatomy) if i not in taken and previous_end <= a[0]
                  and a[1] <= state.start() and len(_words(sentence[a[1]:state.start()])) <= 6]
        after = [i for i, a in enumerate(anatomy) if state.end() <= a[0] < next_start]
        gap = sentence[state.end():anatomy[after[0]][0]] if after else ""
        if _attributive(sentence, state.end()):
            bound = after if after and len(_words(gap)) <= 3 and not re.search(r"[,;:]", gap) else []
            floor = 0
        else:
            bound, floor = before, anatomy[before[-1]][1] if before else 0
        previous_end = state.end()
        if not bound:
            continue
        taken.update(bound)
        verdict = _verdict(sentence, _Span("", state.start(), state.end()), floor)
        kind = state.lastgroup
        if kind == "abnormal":
            label = verdict
        elif kind == "borderline":
            label = NEGATIVE if verdict == NEGATIVE else UNCERTAIN
        elif verdict == NEGATIVE:
            continue  # "not normal" says too little to call a finding
        else:
            label = NEGATIVE
        results += [(anatomy[i][2], label) for i in bound]
    return results


def _combine(labels: list[int]) -> int:
    """CheXpert's rule for several mentions: any positive wins; else uncertain beats negative."""
    if POSITIVE in labels:
        return POSITIVE
    return UNCERTAIN if UNCERTAIN in labels else NEGATIVE


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s and s.strip()]


def label_report(text: str) -> dict[str, int | None]:
    """The 14 observations of one report: 1 positive, 0 negative, -1 uncertain, None not mentioned.

    "No Finding" is 1 when nothing but support devices is positive or uncertain (CheXpert's rule), else None.
    """
    found: dict[str, list[int]] = {}
    for sentence in _sentences(text):
        sentence = sentence.lower()
        for span, weak in _mentions(sentence):
            label = _verdict(sentence, span)
            found.setdefault(span.name, []).append(UNCERTAIN if weak and label == POSITIVE else label)
            if span.name == "Edema" and label != NEGATIVE and re.match(r"heart failure|chf", sentence[span.start:]):
                found.setdefault("Cardiomegaly", []).append(UNCERTAIN)
        for name, label in _anatomy_states(sentence):
            found.setdefault(name, []).append(label)
    labels: dict[str, int | None] = {name: _combine(found[name]) if name in found else None
                                     for name in OBSERVATIONS[1:]}
    finding = any(label in (POSITIVE, UNCERTAIN) for name, label in labels.items() if name != "Support Devices")
    finding = finding or any(label != NEGATIVE for label in found.get(_OTHER, []))
    return {"No Finding": None if finding else POSITIVE, **labels}


def mentioned_observations(text: str) -> set[str]:
    """Observations whose phrases occur in the text at all, negated or not (a keyword baseline for the rules)."""
    return {span.name for sentence in _sentences(text.lower()) for span, _ in _mentions(sentence)
            if span.name != _OTHER}
