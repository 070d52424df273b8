"""Request classification: hazard categories, PII, task type and token estimate.

    classifier = RequestClassifier()                      # built-in, rule-based
    c = classifier.classify(prompt_text)                  # -> Classification
    RequestClassifier(safety=MyLlamaGuard())              # plug in a model classifier

Hazard categories are the 14 codes of Llama Guard 3 (`expertmesh.policies.taxonomy`). The
built-in `KeywordSafetyClassifier` is a lexicon over lower-cased words plus a few phrases: fast
(one tokenising pass, set intersections) and predictable, but it flags words, not intent, so it
over-flags (a history question about a bomb is S9) and misses paraphrase. It is a floor; a
model classifier (Llama Guard 3 itself, served by an engine) implements `SafetyClassifier`
and replaces it without changing a policy.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .pii import PiiFinding, find_pii

_WORD = re.compile(r"[a-z0-9]+")
# Words for keyword matching: ASCII punctuation -> space, then `str.split` (faster than a
# regex `findall`); non-ASCII letters stay inside words.
_PUNCTUATION_TO_SPACE = str.maketrans(dict.fromkeys(string.punctuation, " "))


def words_of(text: str) -> frozenset[str]:
    """The lower-cased words of `text`, as the keyword classifiers see them."""
    return frozenset(text.lower().translate(_PUNCTUATION_TO_SPACE).split())


@dataclass(frozen=True, slots=True)
class Classification:
    safety: frozenset[str]
    """Hazard codes flagged (S1-S14); empty when nothing was flagged."""
    pii: tuple[PiiFinding, ...]
    task: str
    """"chat", "code" or "sql"."""
    prompt_tokens: int
    """Token count (the injected counter's, or `estimate_tokens`)."""

    @property
    def pii_kinds(self) -> frozenset[str]:
        return frozenset(f.kind for f in self.pii)


class SafetyClassifier(Protocol):
    """What a safety classifier must offer; Llama Guard 3 served by an engine fits here."""

    def categories(self, text: str, words: frozenset[str]) -> frozenset[str]:
        """Hazard codes for `text`. `words` is its lower-cased alphanumeric words (already
        computed for task detection; a model classifier ignores it)."""
        ...


class Classifier(Protocol):
    def classify(self, text: str) -> Classification: ...


def estimate_tokens(text: str) -> int:
    """A deliberately high token estimate: UTF-8 bytes / 3, rounded up. English BPE averages
    about 4 bytes per token, code about 3, CJK about 3 bytes (one character) per token, so
    this over-counts most text; a reservation built on it errs towards refusing, not
    overspending. Pass exact counts (`SelectionRequest.prompt_tokens`) when the server has
    tokenised the prompt."""
    return -(-len(text.encode()) // 3)


# Each category: words (matched exactly, lower-case) and phrases (matched as substrings when
# their first word is present). Deliberately small; see the module docstring.
DEFAULT_LEXICON: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "S1": (
        ("murder", "kill", "assassinate", "assassination", "kidnap", "kidnapping", "torture",
         "stab", "strangle", "massacre", "terrorist", "terrorism", "shooting"),
        ("hurt someone", "beat up"),
    ),
    "S2": (
        ("launder", "laundering", "counterfeit", "fraud", "phishing", "shoplift", "burglary",
         "embezzle", "extortion", "smuggle", "smuggling", "ransomware", "malware", "hack",
         "hacking", "keylogger", "meth", "cocaine", "heroin"),
        ("steal a", "break into", "credit card fraud", "pick a lock"),
    ),
    "S3": (
        ("trafficking", "rape", "molest", "grooming"),
        ("sexual assault", "sex trafficking"),
    ),
    "S4": (
        ("csam", "paedophile", "pedophile"),
        ("child porn", "minor sexual", "sexual minor"),
    ),
    "S5": (
        ("defamation", "defame", "slander", "libel"),
        ("false rumor", "false rumour", "spread lies"),
    ),
    "S6": (
        ("diagnose", "diagnosis", "prescription", "dosage", "lawsuit", "legal advice",
         "investment", "invest", "stocks", "medication"),
        ("medical advice", "legal advice", "financial advice", "should i sue"),
    ),
    "S7": (
        ("doxx", "dox", "doxxing", "stalk", "stalking"),
        ("home address of", "track someone", "find out where"),
    ),
    "S8": (
        ("pirate", "piracy", "torrent", "crack", "keygen", "plagiarize", "plagiarise"),
        ("copyrighted", "full lyrics", "bypass drm"),
    ),
    "S9": (
        ("bomb", "explosive", "explosives", "nerve", "sarin", "anthrax", "bioweapon",
         "bioweapons", "nuclear", "uranium", "plutonium", "ricin", "detonator", "napalm"),
        ("chemical weapon", "dirty bomb", "weapon of mass destruction"),
    ),
    "S10": (
        ("slur", "slurs", "supremacy", "supremacist", "genocide", "subhuman", "bigot"),
        ("hate speech", "ethnic cleansing"),
    ),
    "S11": (
        ("suicide", "suicidal", "selfharm", "anorexia", "bulimia", "overdose"),
        ("self harm", "self-harm", "kill myself", "end my life", "cut myself"),
    ),
    "S12": (
        ("porn", "pornographic", "explicit", "nsfw", "erotic", "nude", "nudes"),
        ("sex scene", "sexual content"),
    ),
    "S13": (
        ("ballot", "ballots", "election", "elections", "voting", "voter", "polling"),
        ("vote by", "where to vote", "rig the"),
    ),
    "S14": (
        ("subprocess", "shellcode", "rootkit", "exploit", "privilege"),
        ("rm -rf", "os.system", "reverse shell", "escape the sandbox", "fork bomb"),
    ),
}  # fmt: skip


class KeywordSafetyClassifier:
    """Hazard codes from a lexicon (default `DEFAULT_LEXICON`), precompiled into one word ->
    codes map and a first-word -> phrases map."""

    def __init__(
        self, lexicon: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = DEFAULT_LEXICON
    ) -> None:
        word_codes: dict[str, set[str]] = {}
        phrases: dict[str, list[tuple[str, str]]] = {}
        for code, (words, phrase_list) in lexicon.items():
            for w in words:
                if " " in w:
                    phrase_list = (*phrase_list, w)
                else:
                    word_codes.setdefault(w, set()).add(code)
            for p in phrase_list:
                first = _WORD.findall(p)[0]
                phrases.setdefault(first, []).append((p, code))
        self._word_codes = {w: frozenset(c) for w, c in word_codes.items()}
        self._words = frozenset(self._word_codes)
        self._phrases = phrases
        self._phrase_firsts = frozenset(phrases)

    def categories(self, text: str, words: frozenset[str]) -> frozenset[str]:
        hits = words & self._words
        firsts = words & self._phrase_firsts
        if not hits and not firsts:
            return frozenset()
        codes: set[str] = set()
        for w in hits:
            codes |= self._word_codes[w]
        if firsts:
            lowered = text.lower()
            for first in firsts:
                for phrase, code in self._phrases[first]:
                    if code not in codes and phrase in lowered:
                        codes.add(code)
        return frozenset(codes)


_SQL_WORDS = frozenset({"select", "insert", "update", "delete", "join", "where", "group", "order",
                        "having", "table", "from", "into", "values", "limit"})  # fmt: skip
_SQL_CLAUSES = frozenset({"where", "join", "group", "order", "having", "limit"})
_CODE_WORDS = frozenset({
    "def", "return", "import", "function", "class", "const", "let", "var", "lambda", "struct",
    "python", "javascript", "typescript", "java", "rust", "golang", "cpp", "compile",
    "compiler", "traceback", "exception", "stacktrace", "refactor", "regex", "async", "await",
    "println", "printf", "console", "npm", "pip", "bash", "script", "debug", "variable",
})  # fmt: skip


def detect_task(text: str, words: frozenset[str]) -> str:
    """ "sql", "code" or "chat", from keywords and code punctuation."""
    sql = words & _SQL_WORDS
    if "sql" in words or ("select" in sql and "from" in sql) or {"insert", "into"} <= sql:
        return "sql"
    if "create" in words and "table" in sql and sql & _SQL_CLAUSES:
        return "sql"
    code_hits = len(words & _CODE_WORDS)
    if "```" in text or code_hits >= 2 or (code_hits and ("{" in text or "();" in text)):
        return "code"
    return "chat"


class RequestClassifier:
    """The classifier the selector uses: safety (pluggable), PII, task, token count."""

    def __init__(
        self,
        safety: SafetyClassifier | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        self.safety: SafetyClassifier = safety if safety is not None else KeywordSafetyClassifier()
        self._count_tokens = count_tokens if count_tokens is not None else estimate_tokens

    def classify(self, text: str) -> Classification:
        words = words_of(text)
        return Classification(
            safety=self.safety.categories(text, words),
            pii=find_pii(text),
            task=detect_task(text, words),
            prompt_tokens=self._count_tokens(text),
        )
