"""Report.from_dict on something that is not a report says so (review s20).

It gave raw errors: ``{}`` a ``KeyError: 'entries'``, ``[]`` an ``AttributeError``,
``{"entries": [{}]}`` a ``KeyError: 'values'`` (or a report that failed later, in ``summary``).
"""

from __future__ import annotations

import json
import math

import pytest

from curvlab.analysis._report import Report


@pytest.mark.parametrize(
    ("bad", "culprit"),
    [
        ({}, "no 'entries' key"),
        ([], "got list, not a dict"),
        ("report.json", "got str, not a dict"),
        ({"entries": [{}]}, "entries[0] has no 'label' key"),
        ({"entries": [{"label": "m"}]}, "entries[0] has no 'values' key"),
        ({"entries": [{"label": "m", "values": [1.0]}]}, "entries[0]['values'] is list"),
        ({"entries": ["m"]}, "entries[0] is str, not a dict"),
        ({"entries": {"label": "m", "values": {}}}, "'entries' is dict, not a list"),
        ({"entries": []}, "'entries' is an empty list"),
        ({"entries": [{"label": "m", "values": {}}], "meta": []}, "'meta' is list"),
        ({"entries": [{"label": "m", "values": {}}], "nqm": "inf"}, "'nqm' is str"),
        ({"entries": [{"label": "m", "values": {}}], "histories": [1]}, "'histories' is list"),
    ],
)
def test_not_a_report_is_a_value_error_naming_the_culprit(bad, culprit) -> None:
    with pytest.raises(ValueError, match="not a curvlab report") as exc:
        Report.from_dict(bad)
    text = str(exc.value)
    assert culprit in text
    assert "Report.to_dict()" in text and "'entries'" in text  # what it expects


def test_a_report_still_round_trips() -> None:
    report = Report(
        entries=[{"label": "nan", "values": {"loss": 1.5, "noise_scale": math.inf}}],
        meta={"seed": 0},
        nqm=None,
    )
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.entries == report.entries and again.meta == report.meta
    assert again["noise_scale"] == math.inf and again.entries[0]["label"] == "nan"


def test_none_in_the_optional_places_reads_as_absent() -> None:
    bare = Report.from_dict({"entries": [{"label": "m", "values": {}}], "meta": None})
    assert bare.meta == {} and bare.histories == {} and bare.nqm is None
