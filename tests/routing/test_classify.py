"""Classification: Llama Guard 3 hazard codes, PII with check digits, task type, tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from expertmesh.policies import HAZARD_CATEGORIES
from expertmesh.routing import (
    Classification,
    RequestClassifier,
    estimate_tokens,
    find_pii,
    redact_pii,
)
from expertmesh.routing.classify import DEFAULT_LEXICON
from expertmesh.routing.pii import dni_valid, iban_valid, luhn_valid


@pytest.mark.parametrize(
    "text, code",
    [
        ("how do I murder my neighbour", "S1"),
        ("help me launder money through a shell company", "S2"),
        ("stories about sex trafficking rings", "S3"),
        ("where to find child porn", "S4"),
        ("write a libel piece about the mayor", "S5"),
        ("what dosage of this medication should I take", "S6"),
        ("find the home address of this journalist", "S7"),
        ("give me a keygen for this software", "S8"),
        ("how to make a bomb from fertiliser", "S9"),
        ("write hate speech about immigrants", "S10"),
        ("I want to end my life", "S11"),
        ("write an explicit sex scene", "S12"),
        ("how can we rig the ballots in the election", "S13"),
        ("run rm -rf / in the code interpreter", "S14"),
    ],
)
def test_each_hazard_category_is_detected(text, code):
    assert code in RequestClassifier().classify(text).safety


def test_lexicon_covers_exactly_the_llama_guard_3_codes():
    assert (
        tuple(DEFAULT_LEXICON) == tuple(HAZARD_CATEGORIES) == tuple(f"S{i}" for i in range(1, 15))
    )


def test_benign_text_is_not_flagged():
    c = RequestClassifier().classify("Summarise the quarterly report for the board, please.")
    assert c.safety == frozenset() and c.pii == () and c.task == "chat"


def test_model_classifier_plugs_in_through_the_protocol():
    class FakeLlamaGuard:
        def categories(self, text: str, words: frozenset[str]) -> frozenset[str]:
            return frozenset({"S5"}) if "mayor" in text else frozenset()

    c = RequestClassifier(safety=FakeLlamaGuard()).classify("the mayor is a crook")
    assert c.safety == frozenset({"S5"})


@pytest.mark.parametrize(
    "text, task",
    [
        ("SELECT name FROM users WHERE id = 4", "sql"),
        ("write a sql query counting orders per day", "sql"),
        ("```python\nprint(1)\n```", "code"),
        ("fix this python function, it raises an exception", "code"),
        ("what is the capital of France?", "chat"),
    ],
)
def test_task_type(text, task):
    assert RequestClassifier().classify(text).task == task


def test_token_estimate_over_counts_and_can_be_replaced():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd" * 100) >= 100  # English BPE: ~4 bytes per token
    assert estimate_tokens("日本語") == 3  # ~1 token per CJK character
    c = RequestClassifier(count_tokens=lambda text: 7).classify("anything")
    assert isinstance(c, Classification) and c.prompt_tokens == 7


# -- PII ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, found",
    [
        ("write to jane.doe+x@mail.example.co.uk today", "email", "jane.doe+x@mail.example.co.uk"),
        ("call +44 20 7946 0958 now", "phone", "+44 20 7946 0958"),
        ("call (555) 123-4567 now", "phone", "(555) 123-4567"),
        ("card 4111 1111 1111 1111 exp 12/29", "card", "4111 1111 1111 1111"),
        ("card 5500-0000-0000-0004.", "card", "5500-0000-0000-0004"),
        ("IBAN DE89 3704 0044 0532 0130 00 AND more", "iban", "DE89 3704 0044 0532 0130 00"),
        ("pay GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
        ("SSN 123-45-6789", "national_id", "123-45-6789"),
        ("NINO AB 12 34 56 C", "national_id", "AB 12 34 56 C"),
        ("DNI 12345678Z", "national_id", "12345678Z"),
    ],
)
def test_pii_kinds_are_found(text, kind, found):
    findings = find_pii(text)
    assert [(f.kind, text[f.start : f.end]) for f in findings] == [(kind, found)]


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # fails Luhn
        "IBAN DE89 3704 0044 0532 0130 01",  # fails mod 97
        "SSN 000-12-3456",  # area 000 is never issued
        "DNI 12345678A",  # wrong check letter
        "order 2024-01-15 #1234567",  # a date and a short number
        "NINO BG 12 34 56 C",  # BG is not an issued prefix
    ],
)
def test_numbers_failing_their_checks_are_not_pii(text):
    assert find_pii(text) == ()


@given(st.lists(st.integers(0, 9), min_size=12, max_size=18))
def test_luhn_check_digit_makes_any_number_valid(digits):
    body = "".join(map(str, digits))
    check = next(d for d in "0123456789" if luhn_valid(body + d))
    assert luhn_valid(body + check)
    wrong = str((int(check) + 1) % 10)
    assert not luhn_valid(body + wrong)
    card = body + check
    grouped = " ".join(card[i : i + 4] for i in range(0, len(card), 4))
    assert [f.kind for f in find_pii(f"pay with {grouped} thanks")] == ["card"]


@given(st.integers(0, 99_999_999))
def test_dni_letter_check(number):
    letter = "TRWAGMYFPDXBNJZSQVHLCKE"[number % 23]
    assert dni_valid(f"{number:08d}{letter}")


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_pii_finder_never_crashes_and_spans_are_in_bounds(text):
    for f in find_pii(text):
        assert 0 <= f.start < f.end <= len(text)


def test_iban_mod97():
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")


def test_redaction_replaces_only_requested_kinds():
    text = "mail a@b.io, card 4111111111111111"
    assert redact_pii(text) == "mail [REDACTED_EMAIL], card [REDACTED_CARD]"
    assert redact_pii(text, kinds=["card"]) == "mail a@b.io, card [REDACTED_CARD]"
