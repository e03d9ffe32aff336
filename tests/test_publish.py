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
