"""PII detection and redaction: e-mail addresses, phone numbers, payment cards (Luhn check),
IBANs (ISO 13616 mod-97 check) and national ids (US SSN, UK NINO, Spanish DNI with its check
letter). Check digits keep ordinary numbers (order ids, dates) from being flagged.

Speed (the selector classifies every request): each kind is found from a cheap anchor, so a
2 KB prompt costs two regex scans whose patterns start with a character class (which the
regex engine searches for in C) plus `str.find("@")`; the full patterns and check digits run
only where an anchor hit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from expertmesh.policies.taxonomy import PII_KINDS


@dataclass(frozen=True, slots=True)
class PiiFinding:
    kind: str
    """One of `PII_KINDS`; national ids also carry `detail`."""
    start: int
    end: int
    detail: str = ""
    """For national ids: "us_ssn", "uk_nino" or "es_dni"."""


# E-mail: found from each '@' outwards, so text without '@' costs one `str.find`.
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}$")
_EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}")
# A run of digits with the separators people write in phone and card numbers. The pattern
# starts with a character class so the regex engine scans for it in C.
_NUMBER_RUN = re.compile(r"\d[\d ().-]{6,26}\d")
_SSN = re.compile(r"^(\d{3})-(\d{2})-(\d{4})$")
# IBAN and UK NINO both start with two capitals; a cheap scan finds where, then each is tried.
_CAPS_DIGIT = re.compile(r"[A-Z]{2} ?\d")
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
_NINO = re.compile(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]")

# ISO 13616 IBAN lengths of the SEPA countries; other countries are checked on the whole match.
IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
}  # fmt: skip
_NINO_BAD_PREFIXES = frozenset({"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"})
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters -> 10..35, mod 97 == 1."""
    s = iban.replace(" ", "")
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    expected = IBAN_LENGTHS.get(s[:2])
    if expected is not None and len(s) != expected:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """US SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def dni_valid(dni: str) -> bool:
    """Spanish DNI: eight digits and the letter of (number mod 23)."""
    number, letter = dni[:8], dni[-1]
    return _DNI_LETTERS[int(number) % 23] == letter


def _number_kind(text: str) -> str | None:
    ssn = _SSN.match(text)
    if ssn:
        return "national_id" if ssn_valid(*ssn.groups()) else None
    digits = "".join(ch for ch in text if ch.isdigit())
    n = len(digits)
    # Cards: 13-19 digits, separators only spaces or dashes, Luhn valid.
    if 13 <= n <= 19 and "(" not in text and "." not in text and luhn_valid(digits):
        return "card"
    # Phones: E.164 allows at most 15 digits; 10 without a country code (NANP), 8 with "+".
    if (n >= 10 or (text.startswith("+") and n >= 8)) and n <= 15:
        return "phone"
    return None


def _is_word(text: str, i: int) -> bool:
    """Whether position `i` holds a letter, digit or underscore (False outside the text)."""
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def _iban_end(text: str, start: int, match_end: int) -> int | None:
    """End of the IBAN starting at `start` (the match may run on into following capitals)."""
    expected = IBAN_LENGTHS.get(text[start : start + 2])
    if expected is None:
        ok = not _is_word(text, match_end) and iban_valid(text[start:match_end])
        return match_end if ok else None
    count = 0
    for i in range(start, match_end):
        if text[i] != " ":
            count += 1
            if count == expected:
                end = i + 1
                ok = not _is_word(text, end) and iban_valid(text[start:end])
                return end if ok else None
    return None


def _emails(text: str, found: list[PiiFinding]) -> None:
    at = text.find("@")
    while at != -1:
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if local is not None and domain is not None:
            found.append(PiiFinding("email", local.start(), domain.end()))
        at = text.find("@", at + 1)


def _capital_ids(text: str, found: list[PiiFinding]) -> None:
    for hit in _CAPS_DIGIT.finditer(text):
        start = hit.start()
        if _is_word(text, start - 1):
            continue
        iban = _IBAN.match(text, start)
        end = _iban_end(text, start, iban.end()) if iban is not None else None
        if end is not None:
            found.append(PiiFinding("iban", start, end))
            continue
        nino = _NINO.match(text, start)
        if (
            nino is not None
            and not _is_word(text, nino.end())
            and text[start : start + 2] not in _NINO_BAD_PREFIXES
        ):
            found.append(PiiFinding("national_id", start, nino.end(), "uk_nino"))


def _numbers(text: str, found: list[PiiFinding]) -> None:
    taken = [(f.start, f.end) for f in found]
    for m in _NUMBER_RUN.finditer(text):
        start, end = m.span()
        if start >= 1 and text[start - 1] == "(":
            start -= 1
        if start >= 1 and text[start - 1] == "+":
            start -= 1
        if _is_word(text, start - 1) or any(s < end and start < e for s, e in taken):
            continue
        run = text[start:end]
        if _is_word(text, end):
            # Eight digits and a letter: a Spanish DNI (the letter is a check digit).
            tail = end + 1 if text[end : end + 1] == "-" else end
            if (
                len(run) == 8
                and run.isdigit()
                and text[tail : tail + 1].isupper()
                and not _is_word(text, tail + 1)
                and dni_valid(run + text[tail])
            ):
                found.append(PiiFinding("national_id", start, tail + 1, "es_dni"))
            continue
        kind = _number_kind(run)
        if kind is not None:
            found.append(PiiFinding(kind, start, end, "us_ssn" if kind == "national_id" else ""))


def find_pii(text: str) -> tuple[PiiFinding, ...]:
    """Every PII finding in `text`, in order of position."""
    found: list[PiiFinding] = []
    _emails(text, found)
    _capital_ids(text, found)
    _numbers(text, found)
    found.sort(key=lambda f: f.start)
    return tuple(found)


def redact_pii(
    text: str,
    kinds: Iterable[str] = PII_KINDS,
    findings: tuple[PiiFinding, ...] | None = None,
) -> str:
    """`text` with each finding of `kinds` replaced by `[REDACTED_<KIND>]`. Pass `findings` from
    `find_pii(text)` to skip detecting again."""
    wanted = frozenset(kinds)
    spans = [f for f in (find_pii(text) if findings is None else findings) if f.kind in wanted]
    if not spans:
        return text
    out, pos = [], 0
    for f in spans:
        if f.start < pos:
            continue
        out.append(text[pos : f.start])
        out.append(f"[REDACTED_{f.kind.upper()}]")
        pos = f.end
    out.append(text[pos:])
    return "".join(out)
