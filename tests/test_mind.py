import json

import numpy as np
import pytest
from conftest import news_line, write_split

from rmbert.cli import main
from rmbert.data.mind import MindFormatError, format_time, load_split, parse_time, summarize

NEWS = [
    news_line("N1", "Storm hits coast"),
    news_line("N2", "Stocks rally", "finance"),
    news_line("N3", "Dunk wins it"),
]
BEHAVIORS = [
    "1\tU1\t11/15/2019 8:55:22 AM\tN1 N9 N2\tN2-1 N3-0 N1-0",
    "2\tU2\t11/15/2019 1:05:00 PM\t\tN3-1 N7-0",
    "3\tU1\t11/16/2019 12:00:01 AM\tN9 N8 N9\tN1-0 N2-1",
]


def test_parse_split_arrays_and_missing_ids(tmp_path):
    s = load_split(write_split(tmp_path / "s", NEWS, BEHAVIORS))
    imps = s.impressions
    assert len(s.news) == 3 and len(imps) == 3
    assert imps.imp_ids.tolist() == [1, 2, 3]
    assert imps.users == ["U1", "U2"] and imps.user_idx.tolist() == [0, 1, 0]
    # history: missing ids dropped, order kept (N1, N2 -> rows 0, 1)
    assert imps.hist_ptr.tolist() == [0, 2, 2, 2]
    assert imps.hist.tolist() == [0, 1]
    assert imps.missing_history_refs == 4 and imps.missing_history_ids == {"N9", "N8"}
    assert imps.empty_histories == 1
    assert imps.cand.tolist() == [1, 2, 0, 2, -1, 0, 1]
    assert imps.labels.tolist() == [1, 0, 0, 1, 0, 0, 1]
    assert imps.missing_candidate_ids == {"N7"} and imps.missing_cand_at == {4: "N7"}
    assert imps.times[1] - imps.times[0] == 4 * 3600 + 9 * 60 + 38


def test_bom_crlf_and_summary(tmp_path):
    s = load_split(write_split(tmp_path / "s", NEWS, BEHAVIORS, newline="\r\n", bom=True))
    assert s.news.ids == ["N1", "N2", "N3"]
    assert s.news.title[0] == "Storm hits coast"
    out = summarize(s)
    assert out["candidate_rows"] == 7 and out["clicks"] == 3
    assert out["missing_history_refs"] == 4 and out["missing_history_ids_unique"] == 2
    assert out["empty_histories"] == 1 and out["empty_abstracts"] == 3
    assert len(out["warnings"]) == 2


def test_test_split_without_labels(tmp_path):
    beh = ["7\tU1\t11/15/2019 8:55:22 AM\tN1\tN2 N3", "8\tU3\t11/15/2019 9:00:00 AM\t\tN1"]
    imps = load_split(write_split(tmp_path / "t", NEWS, beh)).impressions
    assert not imps.has_labels and imps.labels.tolist() == [-1, -1, -1]


@pytest.mark.parametrize(
    "which,line,content,needle",
    [
        ("behaviors.tsv", 2, "2\tU2\t11/15/2019 1:05:00 PM\tN3-1 N7-0", "expected 5"),
        ("behaviors.tsv", 2, "2\tU2\t11/15/2019 1:05:00 PM\t\tN3-1 N7-2", "N7-2"),
        ("behaviors.tsv", 3, "3\tU1\t2019-11-16 00:00:01\tN1\tN1-0 N2-1", "time"),
        ("behaviors.tsv", 1, "x\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1", "not an integer"),
        ("news.tsv", 2, "N2\tfinance\tsub\tStocks rally", "expected 8"),
        ("news.tsv", 3, news_line("N1", "dup"), "duplicate news id"),
        ("news.tsv", 2, 'N2\tfinance\tsub\tStocks\t\turl\t[{"Label": "X"\t[]', "not valid JSON"),
        ("news.tsv", 2, 'N2\tfinance\tsub\tStocks\t\turl\t[]\t[{"Label": "X"}]', "without a WikidataId"),
        ("news.tsv", 1, "N1\tfinance\tsub\tStocks\t\turl\t{}\t[]", "not a JSON list"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, which, line, content, needle):
    news, beh = list(NEWS), list(BEHAVIORS)
    (news if which == "news.tsv" else beh)[line - 1] = content
    folder = write_split(tmp_path / "bad", news, beh)
    with pytest.raises(MindFormatError) as e:
        load_split(folder)
    assert e.value.line == line and e.value.path.endswith(which)
    assert needle in str(e.value) and f"{which}:{line}:" in str(e.value)


def test_non_utf8_names_the_line(tmp_path):
    folder = write_split(tmp_path / "b", NEWS, BEHAVIORS)
    raw = (folder / "news.tsv").read_bytes().replace(b"Dunk", b"D\xffnk")
    (folder / "news.tsv").write_bytes(raw)
    with pytest.raises(MindFormatError, match=r"news.tsv:3: not valid UTF-8"):
        load_split(folder)


def test_time_roundtrip():
    for text in ["11/15/2019 8:55:22 AM", "1/1/2020 12:00:00 AM", "2/29/2020 12:30:59 PM"]:
        assert format_time(parse_time(text)) == text
    assert parse_time("2/30/2019 1:00:00 AM") is None and parse_time("13/1/2019 1:00:00 AM") is None
    assert parse_time("11/15/2019 12:00:00 PM") - parse_time("11/15/2019 12:00:00 AM") == 12 * 3600


def test_subset_keeps_rows_aligned(tmp_path):
    imps = load_split(write_split(tmp_path / "s", NEWS, BEHAVIORS)).impressions
    sub = imps.subset(np.array([2, 0]))
    assert sub.imp_ids.tolist() == [3, 1]
    assert sub.cand.tolist() == [0, 1, 1, 2, 0] and sub.labels.tolist() == [0, 1, 1, 0, 0]
    assert sub.hist_ptr.tolist() == [0, 0, 2]


def test_cli_check_ok_and_broken(tmp_path, capsys):
    folder = write_split(tmp_path / "s", NEWS, BEHAVIORS)
    assert main(["data", "check", str(folder), "--encoder", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["impressions"] == 3 and out["missing_history_refs"] == 4
    beh = list(BEHAVIORS)
    beh[1] = beh[1].replace("N3-1", "N3-x")
    bad = write_split(tmp_path / "bad", NEWS, beh)
    assert main(["data", "check", str(bad), "--encoder", "none"]) == 2
    err = capsys.readouterr().err
    assert "behaviors.tsv:2:" in err and "Traceback" not in err


def entity(qid: str, label: str = "E") -> dict:
    return {"Label": label, "Type": "P", "WikidataId": qid, "Confidence": 1.0, "OccurrenceOffsets": [0]}


def test_entities_parse_into_csr_arrays(tmp_path):
    t1, a1 = json.dumps([entity("Q1"), entity("Q2"), entity("Q1")]), json.dumps([entity("Q3"), entity("Q2")])
    news = [
        f"N1\tsports\tsub\tStorm\tabs\turl\t{t1}\t{a1}",
        "N2\tsports\tsub\tCalm\t\turl\t\t",
        f"N3\tsports\tsub\tDunk\t\turl\t[]\t{json.dumps([entity('Q9')])}",
    ]
    s = load_split(write_split(tmp_path / "e", news, ["1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1"]))
    te, ae = s.news.title_entities, s.news.abstract_entities
    assert te.ptr.tolist() == [0, 2, 2, 2] and te.of(0) == [
        "Q1",
        "Q2",
    ]  # a repeat within one news counts once
    assert ae.ptr.tolist() == [0, 2, 2, 3] and ae.of(0) == ["Q3", "Q2"] and ae.of(2) == ["Q9"]
    assert s.news.entities(0) == ["Q1", "Q2", "Q3"] and s.news.entities(1) == []
    out = summarize(s)
    assert out["news_with_entities"] == 2 and out["entities_unique"] == 4
