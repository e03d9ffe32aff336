from marketplace_classifier.ops.publish import main, publish

DOC = """# Results

<!-- include reports/x/summary.md#2 -->
old table
<!-- end include -->

<!-- include reports/x/speed.md -->
<!-- end include -->
"""


def test_docs_are_filled_from_their_reports_and_checked(tmp_path, monkeypatch, capsys):
    reports = tmp_path / "reports" / "x"
    reports.mkdir(parents=True)
    (reports / "summary.md").write_text("| a |\n|---|\n\nBranches:\n\n| b |\n|---|\n| 0.8 |\n")
    (reports / "speed.md").write_text("12.5 items/s\n")
    doc = tmp_path / "results.md"
    doc.write_text(DOC)
    filled = publish(doc, root=tmp_path)
    assert "old table" not in filled and "Branches:\n<!-- end include -->" in filled
    assert "-->\n12.5 items/s\n<!-- end include -->" in filled
    monkeypatch.setattr("marketplace_classifier.ops.publish.ROOT", tmp_path)
    assert main([str(doc), "--check"]) == 1
    assert main([str(doc)]) == 0 and doc.read_text() == filled
    assert main([str(doc), "--check"]) == 0
    (reports / "speed.md").unlink()
    assert main([str(doc)]) == 2
    assert "reports/x/speed.md not found" in capsys.readouterr().err


def test_a_figure_inside_a_sentence_comes_from_its_json_report(tmp_path, monkeypatch, capsys):
    reports = tmp_path / "reports" / "bulk"
    reports.mkdir(parents=True)
    (reports / "bulk.json").write_text(
        '{"ways": {"served (client)": {"listings_per_second": 65.47991}}, "nodes": [294, 306]}')
    doc = tmp_path / "benchmark.md"
    doc.write_text("Served: <!-- value reports/bulk/bulk.json | ways/served (client)/listings_per_second "
                   "| .1f -->0<!-- end --> listings/s; the second node took <!-- value "
                   "reports/bulk/bulk.json | nodes/1 -->?<!-- end -->.\n")
    filled = publish(doc, root=tmp_path)
    assert "listings_per_second | .1f -->65.5<!-- end --> listings/s" in filled
    assert "nodes/1 -->306<!-- end -->." in filled
    doc.with_name("again.md").write_text(filled)  # filling a filled doc changes nothing
    assert publish(doc.with_name("again.md"), root=tmp_path) == filled
    doc.write_text("<!-- value reports/bulk/bulk.json | ways/gone | .1f -->0<!-- end -->\n")
    monkeypatch.setattr("marketplace_classifier.ops.publish.ROOT", tmp_path)
    assert main([str(doc)]) == 2
    assert "has no 'ways/gone' (stopped at 'gone')" in capsys.readouterr().err


def test_keep_missing_fills_what_this_machine_has_and_names_the_rest(tmp_path, monkeypatch, capsys):
    (tmp_path / "reports" / "x").mkdir(parents=True)
    (tmp_path / "reports" / "x" / "speed.md").write_text("12.5 items/s\n")
    doc = tmp_path / "benchmark.md"
    doc.write_text("<!-- include reports/x/speed.md -->\nold\n<!-- end include -->\n"
                   "<!-- include reports/gone/memory.md -->\nkept table\n<!-- end include -->\n"
                   "at <!-- value reports/gone/memory.json | peak | , -->7,998<!-- end --> MiB\n")
    monkeypatch.setattr("marketplace_classifier.ops.publish.ROOT", tmp_path)
    assert main([str(doc)]) == 2  # by default a missing report is an error
    assert main([str(doc), "--keep-missing"]) == 0
    text = doc.read_text()
    assert "-->\n12.5 items/s\n<!-- end" in text and "kept table" in text and "-->7,998<!-- end -->" in text
    err = capsys.readouterr().err
    assert "reports/gone/memory.md not found" in err and "reports/gone/memory.json not found" in err
