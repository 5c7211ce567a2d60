"""Parsing of the ``Prefer`` request header (RFC 7240)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_restful_async.prefer import (
    MAX_WAIT_SECONDS,
    Preference,
    parse_prefer,
    respond_async,
    wait_seconds,
)


def P(name: str, value: str | None = None, **params: str | None) -> Preference:
    return Preference(name, value, dict(params))


# -- RFC 7240 examples -------------------------------------------------------


def test_rfc_section_2_respond_async_and_wait() -> None:
    prefs = parse_prefer(["respond-async, wait=100"])
    assert prefs == {"respond-async": P("respond-async"), "wait": P("wait", "100")}
    assert list(prefs) == ["respond-async", "wait"]
    assert respond_async(prefs)
    assert wait_seconds(prefs) == 100


def test_rfc_section_2_several_header_fields_are_one_list() -> None:
    one = parse_prefer(["respond-async, wait=100, handling=lenient"])
    several = parse_prefer(["respond-async, wait=100", "handling=lenient"])
    assert one == several
    assert several["handling"] == P("handling", "lenient")


def test_rfc_section_2_first_occurrence_wins() -> None:
    # "Prefer: wait=10, wait=100" ... only the first instance is considered.
    assert parse_prefer(["wait=10, wait=100"])["wait"] == P("wait", "10")
    assert wait_seconds(parse_prefer(["wait=10", "wait=100"])) == 10


@pytest.mark.parametrize("header", ["foo; bar", 'foo; bar=""', 'foo=""; bar'])
def test_rfc_section_2_empty_values_are_no_value(header: str) -> None:
    assert parse_prefer([header]) == {"foo": P("foo", bar=None)}


def test_rfc_section_4_examples() -> None:
    assert parse_prefer(["return=minimal"]) == {"return": P("return", "minimal")}
    assert parse_prefer(["return=representation"])["return"].value == "representation"
    assert parse_prefer(["handling=lenient"]) == {"handling": P("handling", "lenient")}
    assert parse_prefer(["handling=strict"])["handling"].value == "strict"
    prefs = parse_prefer(["respond-async"])
    assert respond_async(prefs)
    assert wait_seconds(prefs) is None


def test_parameters() -> None:
    prefs = parse_prefer(['foo=bar; A=1; b="two words"; c; B=ignored'])
    assert prefs["foo"] == P("foo", "bar", a="1", b="two words", c=None)


def test_no_header() -> None:
    assert parse_prefer([]) == {}
    assert parse_prefer([""]) == {}
    assert not respond_async({})
    assert wait_seconds({}) is None


def test_single_string_is_one_field_value() -> None:
    assert parse_prefer("wait=5, respond-async") == parse_prefer(["wait=5, respond-async"])


# -- case and whitespace -----------------------------------------------------


def test_names_are_case_insensitive_values_are_not() -> None:
    prefs = parse_prefer(["Respond-Async, WAIT=10, Return=Minimal"])
    assert set(prefs) == {"respond-async", "wait", "return"}
    assert respond_async(prefs)
    assert wait_seconds(prefs) == 10
    assert prefs["return"].value == "Minimal"


def test_first_wins_across_case() -> None:
    assert parse_prefer(["WAIT=1", "wait=2"])["wait"].value == "1"


@pytest.mark.parametrize(
    "header",
    [
        "wait = 10",
        "wait\t=\t10",
        " wait=10 ",
        "wait=10 ; x = y",
        "wait=10;x=y",
        ",wait=10,",
        " , ,wait=10 ,, ",
    ],
)
def test_optional_whitespace_and_empty_elements(header: str) -> None:
    prefs = parse_prefer([header])
    assert list(prefs) == ["wait"]
    assert wait_seconds(prefs) == 10


def test_whitespace_around_commas() -> None:
    prefs = parse_prefer([" respond-async ,wait=5 "])
    assert respond_async(prefs)
    assert wait_seconds(prefs) == 5


def test_empty_parameters_are_allowed() -> None:
    # *( OWS ";" [ OWS parameter ] )
    assert parse_prefer(["foo;; ;bar;"]) == {"foo": P("foo", bar=None)}


# -- quoted strings ----------------------------------------------------------


def test_quoted_value_with_separators_inside() -> None:
    prefs = parse_prefer(['foo="a,b;c", wait=3'])
    assert prefs["foo"] == P("foo", "a,b;c")
    assert wait_seconds(prefs) == 3


def test_quoted_parameter_with_separators_inside() -> None:
    prefs = parse_prefer(['foo; p="x=1, y=2; z", wait=3'])
    assert prefs["foo"] == P("foo", p="x=1, y=2; z")
    assert wait_seconds(prefs) == 3


def test_escapes() -> None:
    prefs = parse_prefer([r'a="say \"hi\"", b="back\\slash", c="\a\b", d="\,", e="\;"'])
    assert prefs["a"].value == 'say "hi"'
    assert prefs["b"].value == "back\\slash"
    assert prefs["c"].value == "ab"
    assert prefs["d"].value == ","
    assert prefs["e"].value == ";"


def test_escaped_quote_does_not_end_the_string() -> None:
    prefs = parse_prefer([r'foo="a\", wait=1", wait=2'])
    assert prefs["foo"].value == 'a", wait=1'
    assert wait_seconds(prefs) == 2


def test_quoted_wait_is_accepted() -> None:
    assert wait_seconds(parse_prefer(['wait="7"'])) == 7


def test_obs_text_in_quoted_string() -> None:
    assert parse_prefer(['foo="caf\xe9 \u2603"'])["foo"].value == "caf\xe9 \u2603"


# -- malformed input ---------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "=",
        "==",
        ";;;",
        ",,,",
        "; wait=1",
        "=10",
        '"wait"=10',
        "wa it=10",
        "wait=1 0",
        "wait@=10",
        'foo="unterminated',
        'foo="bad"x',
        'foo="ctl\x01"',
        'foo="del\x7f"',
        'foo="a\\',
        "w\xe4it=10",
        "\u212aey=1",  # KELVIN SIGN lowercases to ASCII "k"
        "foo=\u2603",
        "foo=a\nb",
        "foo; =x",
        "foo; p q",
        "foo; p=a b",
    ],
)
def test_malformed_elements_are_ignored(header: str) -> None:
    assert parse_prefer([header]) == {}
    # The malformed element goes last in its field: an unterminated quoted
    # string swallows the rest of the field value.
    assert parse_prefer([f"respond-async, {header}", "handling=lenient"]) == {
        "respond-async": P("respond-async"),
        "handling": P("handling", "lenient"),
    }


def test_malformed_occurrence_does_not_win() -> None:
    assert wait_seconds(parse_prefer(["wait=1 0, wait=2"])) == 2
    assert wait_seconds(parse_prefer(['wait="1', "wait=2"])) == 2


def test_unterminated_quote_swallows_the_rest_of_its_field_only() -> None:
    prefs = parse_prefer(['wait=5, foo="abc, respond-async', "handling=lenient"])
    assert wait_seconds(prefs) == 5
    assert "foo" not in prefs
    assert not respond_async(prefs)  # inside the unterminated string
    assert "handling" in prefs


@pytest.mark.parametrize(
    "header",
    [
        "wait=",
        'wait=""',
        "wait",
        "wait=-1",
        "wait=+1",
        "wait=1.5",
        "wait=1e3",
        "wait=abc",
        "wait=0x10",
        'wait=" 10"',
        "wait=\uff11",  # FULLWIDTH DIGIT ONE
        "wait=\u0661",  # ARABIC-INDIC DIGIT ONE
        "wait=\xb2",  # SUPERSCRIPT TWO
    ],
)
def test_invalid_wait(header: str) -> None:
    assert wait_seconds(parse_prefer([header])) is None


def test_wait_empty_value_still_claims_the_name() -> None:
    # wait= is wait with no value (RFC 7240 section 2), so a later wait loses.
    assert wait_seconds(parse_prefer(["wait=, wait=10"])) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0),
        ("000", 0),
        ("007", 7),
        ("2147483647", 2**31 - 1),
        ("2147483648", 2**31),
        ("2147483649", 2**31),
        ("99999999999", 2**31),
        ("9" * 10_000, 2**31),
        ("0" * 10_000 + "5", 5),
    ],
)
def test_wait_values(value: str, seconds: int) -> None:
    assert wait_seconds(parse_prefer([f"wait={value}"])) == seconds
    assert MAX_WAIT_SECONDS == 2**31


def test_respond_async_with_value_or_params_is_still_present() -> None:
    assert respond_async(parse_prefer(["respond-async=yes; x"]))


def test_very_long_input_is_fast() -> None:
    many = ", ".join(f"p{i}=v{i}; q=w" for i in range(5_000))
    huge_quoted = 'foo="' + "a,;" * 30_000 + '", wait=4'
    unterminated = 'foo="' + "x" * 100_000
    start = time.perf_counter()
    prefs = parse_prefer([many, huge_quoted, unterminated, "wait=9"])
    assert time.perf_counter() - start < 1.0
    assert len(prefs) == 5_002
    assert prefs["p4999"] == P("p4999", "v4999", q="w")
    assert wait_seconds(prefs) == 4


def test_preference_is_frozen_and_hashable() -> None:
    pref = P("foo", "bar", x="1")
    with pytest.raises(AttributeError):
        pref.name = "other"  # type: ignore[misc]
    assert hash(pref) == hash(P("foo", "bar"))


# -- properties --------------------------------------------------------------

_prefer_alphabet = st.sampled_from(list('aAwWiItT=;, \t"\\0123456789-.\xe9\u212a\x00\n'))
_prefer_like = st.text(_prefer_alphabet, max_size=40)


def _check(values: list[str]) -> None:
    prefs = parse_prefer(values)
    for key, pref in prefs.items():
        assert key == pref.name
        assert pref.name == pref.name.lower()
        assert pref.name.isascii()
        assert pref.name
        assert pref.value != ""
        assert all(k == k.lower() and k.isascii() for k in pref.params)
    seconds = wait_seconds(prefs)
    assert seconds is None or 0 <= seconds <= MAX_WAIT_SECONDS
    assert isinstance(respond_async(prefs), bool)


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_any_text_is_parsed_without_error(value: str) -> None:
    _check([value])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(), _prefer_like), max_size=5))
def test_any_list_of_text_is_parsed_without_error(values: list[str]) -> None:
    _check(values)


@settings(max_examples=150, deadline=None)
@given(st.lists(_prefer_like, min_size=1, max_size=5))
def test_several_fields_equal_one_joined_field_without_quotes(values: list[str]) -> None:
    # RFC 7230 section 3.2.2: several fields are equivalent to their values
    # joined with commas, as long as no quoted string spans a field boundary.
    if any('"' in v for v in values):
        values = [v.replace('"', "") for v in values]
    assert parse_prefer(values) == parse_prefer([",".join(values)])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text("abcXYZ-", min_size=1, max_size=6),
            st.one_of(st.none(), st.text(min_size=1, max_size=10)),
        ),
        max_size=6,
    )
)
def test_round_trip_of_well_formed_preferences(items: list[tuple[str, str | None]]) -> None:
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    # Only characters a quoted-string may hold: HTAB, SP, VCHAR, obs-text.
    items = [
        (
            n,
            None
            if v is None
            else "".join(c for c in v if c in " \t" or (c > "\x20" and c != "\x7f")),
        )
        for n, v in items
    ]
    header = " , ".join(n if v is None else f"{n} = {quote(v)}" for n, v in items)
    expected: dict[str, Preference] = {}
    for n, v in items:
        expected.setdefault(n.lower(), P(n.lower(), v or None))
    assert parse_prefer([header]) == expected
