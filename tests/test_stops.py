"""Stop strings over text that arrives in pieces: what is shown is exactly the text before the
first stop string, however the pieces split it, and nothing of a stop string leaks."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llmrun.runtime.stops import StopStrings


def _run(stops, pieces):
    matcher, shown = StopStrings(stops), []
    for piece in pieces:
        text, hit = matcher.push(piece)
        shown.append(text)
        if hit:
            return "".join(shown), True
    return "".join(shown) + matcher.flush(), False


def _expected(stops, pieces):
    """Generation ends with the first piece after which some stop string is in the text: the
    text before the earliest one there (a longer stop that would have begun earlier never
    arrives)."""
    text = ""
    for piece in pieces:
        text += piece
        found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if found:
            return text[:min(found)], True
    return text, False


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.text("ab\n", max_size=5), max_size=8))
def test_shown_text_is_the_text_before_the_first_stop(stops, pieces):
    assert _run(stops, pieces) == _expected(stops, pieces)


def test_a_stop_string_split_over_pieces_is_held_back_then_cut():
    matcher = StopStrings(["</end>"])
    assert matcher.push("done </") == ("done ", False)  # "</" may begin the stop: held
    assert matcher.push("en") == ("", False)
    assert matcher.push("d> more") == ("", True)
    assert matcher.push("after") == ("", True)


def test_held_text_that_was_no_stop_comes_out():
    matcher = StopStrings(["STOP"])
    assert matcher.push("ST") == ("", False)
    assert matcher.push("AY") == ("STAY", False)
    assert matcher.push("S") == ("", False)
    assert matcher.flush() == "S"
