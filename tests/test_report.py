"""`python -m jaxmem.report` and the example notebook, on fake run directories."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import pytest

from jaxmem import load_run, report
from jaxmem.analysis import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "explore_scores.ipynb")


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data)
            for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_embeds_every_figure_for_several_runs(fake_run_dir, tmp_path):
    small = fake_run_dir("small", arch="small_vgg", num_params=490_000, seed=1, strength=0.7)
    large = fake_run_dir("large", arch="med_vgg", num_params=970_000, seed=2)
    out = str(tmp_path / "out" / "report.html")
    assert report.build_report([large, small], out) == out
    with open(out, encoding="utf-8") as f:
        page = f.read()
    images = embedded_pngs(page)
    # size, gap, curve, run histograms; per run: curve, epoch histograms, the estimators'
    # convergence, gallery, pairs
    assert len(images) == 4 + 2 * 5
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert "Table 1" in page and "digits/small_vgg" in page and "digits/med_vgg" in page
    assert "Pearson r = " in page and "Model-wise transient memorization" in page
    assert page.index("Run digits/small_vgg") < page.index("Run digits/med_vgg")  # by size
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")


def test_report_cli_single_run_default_output(fake_run_dir, capsys):
    run = fake_run_dir("one")
    assert report.main([run, "--no-galleries"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(run, "report.html") and os.path.exists(path)
    with open(path, encoding="utf-8") as f:
        page = f.read()
    # curve, run histogram; the run's curve, epoch histograms and estimators' convergence
    assert len(embedded_pngs(page)) == 5
    assert "reliability" in page and "estimators by models" in page  # the figure's alt text
    assert "Figure 1" not in page  # size and gap need several runs


def test_report_without_the_dataset_notes_it(fake_run_dir, tmp_path):
    run = fake_run_dir("odd", dataset="synthetic", num_train=100, num_test=40)
    out = report.build_report([run], str(tmp_path / "r.html"))
    with open(out, encoding="utf-8") as f:
        assert "No images:" in f.read()


def test_report_of_a_run_without_finite_scores(fake_run_dir, tmp_path):
    run = fake_run_dir("few", num_models=4)  # fewer than min_count held-out models: all NaN
    out = report.build_report([run], str(tmp_path / "few.html"))
    with open(out, encoding="utf-8") as f:
        page = f.read()
    assert "no finite scores" in page and "<td>memorized (last epoch)</td><td>0</td>" in page
    convergence = figures.estimator_convergence(load_run(run))  # nothing to plot: said so
    assert [text.get_text() for text in convergence.axes[0].texts] == [
        "no correlation to show: too few scores that differ"]


@pytest.mark.parametrize("damage", ["missing", "config", "scores"])
def test_bad_run_dirs_give_one_line_and_exit_2(fake_run_dir, tmp_path, capsys, damage):
    if damage == "missing":
        target = str(tmp_path / "nowhere")
    else:
        target = fake_run_dir("broken", num_train=50, num_test=20, dataset="synthetic")
        name = "config.json" if damage == "config" else "scores.npz"
        with open(os.path.join(target, name), "w") as f:
            f.write("{not json")
    assert report.main([target, "--out", str(tmp_path / "r.html")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxmem.report", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_notebook_executes_on_a_fake_run(fake_run_dir, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("JAXMEM_RUN", fake_run_dir("nb"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert "JAXMEM_RUN" in notebook.cells[1].source
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    text = "".join(o.get("text", "") for o in outputs)
    assert "digits/tiny_cnn" in text and "high-influence pairs" in text
    json.dumps(notebook)  # still a plain notebook
