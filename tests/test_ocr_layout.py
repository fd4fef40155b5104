"""Layout-aware OCR on tiny random models: PP-DocLayoutV3 regions -> per-region prompts -> SDK-shaped JSON/Markdown."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastsd.errors import UserInputError
from fastsd.ocr import ocr
from fastsd.ocr.engine import TransformersEngine
from fastsd.ocr.layout import LABELS, LayoutDetector, LayoutSettings, Region, order_sequence, postprocess
from fastsd.ocr.processor import PatchGrid
from fastsd.ocr.regions import assemble, crop, format_content

ID2LABEL = dict(enumerate(LABELS))
FAST = {"input_size": 320}  # the checkpoint's 800 px is the default; the tiny model reads 320 px in tests


def page(text: str, size=(600, 800)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((30, 30), text, fill="black")
    return im


@pytest.fixture(scope="module")
def layout_model(tmp_path_factory):
    from fastsd.demo.tiny_layout import save_pp_doclayout

    bias = {"text": 4.0, "table": 4.0, "display_formula": 4.0, "image": 4.0, "doc_title": 4.0}
    return save_pp_doclayout(tmp_path_factory.mktemp("pp-doclayout"), bias=bias, anchors=True)


@pytest.fixture(scope="module")
def detector(layout_model):
    return LayoutDetector(str(layout_model), device="cpu", settings=LayoutSettings(**FAST), local_files_only=True)


@pytest.fixture(scope="module")
def engine(tiny_glm_ocr):
    return TransformersEngine(str(tiny_glm_ocr), device="cpu", max_new_tokens=4, local_files_only=True)


def detections(rows):
    """(label, score, box, order) rows -> the arrays postprocess takes."""
    labels = np.array([LABELS.index(r[0]) for r in rows])
    scores = np.array([r[1] for r in rows], dtype=np.float32)
    boxes = np.array([r[2] for r in rows], dtype=np.float32)
    order = np.array([r[3] for r in rows])
    return scores, labels, boxes, order


# --------------------------------------------------------------------------- the SDK's rules
def test_postprocess_applies_the_sdk_rules():
    rows = [
        ("paragraph_title", 0.9, (50, 40, 550, 80), 1),
        ("text", 0.8, (50, 100, 550, 300), 3),
        ("text", 0.7, (52, 102, 548, 298), 4),  # a duplicate of the one above: NMS drops it
        ("text", 0.9, (60, 400, 200, 420), 5),  # inside the table: dropped (containment merge)
        ("table", 0.95, (50, 380, 550, 600), 2),
        ("header", 0.9, (0, 0, 600, 30), 0),  # abandon: not in the output
        ("image", 0.9, (0, 0, 600, 790), 6),  # nearly the whole page: not a region
        ("image", 0.6, (100, 620, 300, 760), 7),  # a picture: kept, not read
        ("display_formula", 0.2, (300, 620, 500, 700), 8),  # under the 0.3 threshold
    ]
    regions = postprocess(*detections(rows), (600, 800), LayoutSettings(), ID2LABEL)
    assert [(r.label, r.task) for r in regions] == [
        ("paragraph_title", "text"),
        ("table", "table"),
        ("text", "text"),
        ("image", "skip"),
    ]
    assert [r.index for r in regions] == [0, 1, 2, 3]
    assert regions[1].bbox_2d == [83, 475, 916, 750] and regions[1].box == (50, 380, 550, 600)
    # per-label threshold and an overridden table (SDK style: task -> [labels]) change the outcome
    settings = LayoutSettings.load(
        {"threshold_by_label": {"display_formula": 0.1}, "label_tasks": {"abandon": ["image"]}}
    )
    regions = postprocess(*detections(rows), (600, 800), settings, ID2LABEL)
    assert "image" not in [r.label for r in regions] and "display_formula" in [r.label for r in regions]


def test_small_merge_reference_box_drops_its_container():
    # as in the SDK: the reference box goes for lying inside the text box ("large" rule of text), and
    # the text box goes for holding a reference box ("small" rule of reference); a box beside stays
    rows = [
        ("reference", 0.9, (50, 100, 300, 150), 0),
        ("text", 0.9, (40, 90, 310, 160), 1),
        ("text", 0.9, (40, 300, 310, 360), 2),
    ]
    settings = LayoutSettings.load({"label_tasks": {"reference": "text"}})
    regions = postprocess(*detections(rows), (600, 800), settings, ID2LABEL)
    assert [r.box for r in regions] == [(40, 300, 310, 360)]
    settings = LayoutSettings.load({"label_tasks": {"reference": "text"}, "small_merge": []})
    regions = postprocess(*detections(rows), (600, 800), settings, ID2LABEL)
    assert [r.box for r in regions] == [(40, 90, 310, 160), (40, 300, 310, 360)]


def test_settings_are_data_and_bad_ones_are_refused(tmp_path):
    f = tmp_path / "layout.json"
    f.write_text(json.dumps({"threshold": 0.5, "label_tasks": {"chart": "text"}}))
    s = LayoutSettings.load(f)
    assert s.threshold == 0.5 and s.label_tasks["chart"] == "text" and s.label_tasks["table"] == "table"
    assert s.fingerprint() != LayoutSettings().fingerprint()
    with pytest.raises(UserInputError, match="unknown key"):
        LayoutSettings.load({"treshold": 0.5})
    with pytest.raises(UserInputError, match="maps to 'ocr'"):
        LayoutSettings.load({"label_tasks": {"table": "ocr"}})
    with pytest.raises(UserInputError, match="between 0 and 1"):
        LayoutSettings.load({"threshold": 3})
    f.write_text("{not json")
    with pytest.raises(UserInputError, match="not a readable JSON"):
        LayoutSettings.load(f)


def test_reading_order_ranks_follow_the_pairwise_logits():
    import torch

    # query 2 comes first, then 0, then 1: logit[i, j] > 0 means i before j
    before = {(2, 0), (2, 1), (0, 1)}
    logits = torch.tensor([[[8.0 if (i, j) in before else -8.0 for j in range(3)] for i in range(3)]])
    assert order_sequence(logits).tolist() == [[1, 2, 0]]


def test_region_formatting_and_page_assembly():
    assert format_content("Intro", "text", "doc_title") == "# Intro"
    assert format_content("## Methods", "text", "paragraph_title") == "## Methods"
    assert format_content("\\[ x^2 \\]", "formula", "display_formula") == "$$\nx^2\n$$"
    assert format_content("<table><tr><td>1</td></tr></table>", "table", "table").startswith("<table>")
    assert format_content("a\nb", "text", "text") == "a\n\nb"
    assert format_content("Total ........ 5", "text", "text") == "Total ... 5"
    regions = [
        Region(0, "doc_title", "text", 0.9, (0, 0, 10, 10), [0, 0, 16, 12]),
        Region(1, "text", "text", 0.9, (0, 10, 10, 20), [0, 12, 16, 25]),
        Region(2, "image", "skip", 0.9, (0, 20, 10, 30), [0, 25, 16, 37]),
        Region(3, "inline_formula", "formula", 0.9, (0, 30, 10, 40), [0, 37, 16, 50]),
        Region(4, "formula_number", "text", 0.9, (10, 30, 12, 40), [16, 37, 20, 50]),
    ]
    records, md = assemble(regions, {0: "Title", 1: "   ", 3: "E=mc^2", 4: "(1)"}, {2: "imgs/p.png"})
    assert [(r["index"], r["label"], r["native_label"]) for r in records] == [
        (0, "text", "doc_title"),
        (1, "image", "image"),
        (2, "formula", "inline_formula"),
    ]  # the empty text region is left out, and the formula number merged into its formula, as the SDK does
    assert set(records[0]) == {"index", "label", "native_label", "content", "bbox_2d"}
    assert md == "# Title\n\n![image](imgs/p.png)\n\n$$\nE=mc^2 \\tag{1}\n$$"


def test_a_misread_region_is_refused_by_crop():
    grid = PatchGrid(min_pixels=112 * 112, max_pixels=224 * 224)
    with pytest.raises(ValueError, match="outside"):
        crop(page("x"), Region(0, "text", "text", 0.9, (500, 700, 900, 900), [0, 0, 1, 1]), grid)
    piece = crop(page("x"), Region(0, "text", "text", 0.9, (10, 10, 14, 14), [0, 0, 1, 1]), grid)
    assert piece.size[0] % 28 == 0 and piece.size[1] % 28 == 0  # a 4 px box still reaches the model's grid


# --------------------------------------------------------------------------- the tiny models
def test_tiny_detector_finds_ordered_regions_of_the_table(detector):
    results = detector.detect([page("a"), page("b", (800, 600))])
    assert len(results) == 2
    for regions, (w, h) in zip(results, [(600, 800), (800, 600)], strict=True):
        assert regions, "the biased tiny model finds regions"
        assert [r.index for r in regions] == list(range(len(regions)))
        for r in regions:
            assert r.task == LayoutSettings().label_tasks[r.label] != "abandon"
            x1, y1, x2, y2 = r.box
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert all(0 <= v <= 1000 for v in r.bbox_2d)
    assert {r.task for regions in results for r in regions} >= {"text", "table"}


def test_layout_run_reads_each_region_with_its_prompt_across_pages(tmp_path, engine, detector):
    for i in range(2):
        page(f"page {i}").save(tmp_path / f"p{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    seen: list[list] = []
    real_run = engine.run

    def recording_run(jobs):
        seen.append([(j.key, j.prompt) for j in jobs])
        return real_run(jobs)

    engine.run = recording_run
    try:
        job = ocr([str(tmp_path)], out=tmp_path / "out", engine_obj=engine, layout=True, layout_obj=detector,
                  draw_boxes=True, progress=False)  # fmt: skip
        results = list(job)
    finally:
        del engine.run
    assert job.summary.done == 2 and len(job.summary.failed) == 1 and "broken.png" in job.summary.failed[0][0]
    prompts = {p for batch in seen for _, p in batch}
    assert prompts <= {"Text Recognition:", "Table Recognition:", "Formula Recognition:"}
    assert {"Text Recognition:", "Table Recognition:"} <= prompts
    assert any(len({k[0] for k, _ in batch}) == 2 for batch in seen), "regions of both pages share a batch"
    for res in results:
        assert res.task == "layout" and res.regions is not None
        folder = tmp_path / "out" / res.document
        doc = json.loads((folder / "document.json").read_text())
        assert doc["pages"][0]["regions"] == res.regions
        for rec in res.regions:
            assert {"index", "label", "native_label", "content", "bbox_2d"} <= set(rec)
            assert rec["label"] in ("text", "table", "formula", "image")
        assert res.text == "\n\n".join(
            f"![{r['native_label']}]({r['image_path']})" if r["label"] == "image" else r["content"] for r in res.regions
        )
        assert (folder / "layout_0001.png").is_file() and (folder / "document.md").is_file()
        for rec in res.regions:
            if rec["label"] == "image":
                assert (folder / rec["image_path"]).is_file()
    # a rerun with the same settings skips the pages; other settings redo them
    again = ocr(
        [str(tmp_path)], out=tmp_path / "out", engine_obj=engine, layout=True, layout_obj=detector, progress=False
    )
    assert all(r.skipped for r in again)


def test_layout_failure_on_one_page_reads_it_whole_and_the_batch_goes_on(tmp_path, engine, detector, monkeypatch):
    page("ok").save(tmp_path / "a.png")
    page("odd", (500, 700)).save(tmp_path / "b.png")
    real = detector.detect

    def detect(images):
        if any(im.size[0] < 600 for im in images):
            raise RuntimeError("the layout model could not read this page")
        return real(images)

    monkeypatch.setattr(detector, "detect", detect)
    results = {r.document: r for r in ocr([str(tmp_path)], out=tmp_path / "out", engine_obj=engine, layout=True,
                                          layout_obj=detector, progress=False)}  # fmt: skip
    assert any("layout detection failed" in w for w in results["b"].warnings)
    assert [r["bbox_2d"] for r in results["b"].regions] in ([[0, 0, 1000, 1000]], [])
    assert not any("layout detection failed" in w for w in results["a"].warnings) and results["a"].regions


def test_cli_layout_mode_and_its_usage_errors(tmp_path, cli, home, tiny_glm_ocr, layout_model):
    page("cli").save(tmp_path / "in.png")
    (tmp_path / "layout.json").write_text(json.dumps(FAST))
    common = ["--model", str(tiny_glm_ocr), "--device", "cpu", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]
    r = cli("ocr", str(tmp_path / "in.png"), *common, "--layout-model", str(layout_model),
            "--layout-settings", str(tmp_path / "layout.json"), "--crops")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "out" / "in" / "document.json").read_text())
    assert doc["task"] == "layout" and doc["layout_model"] == str(layout_model) and doc["pages"][0]["regions"]
    assert list((tmp_path / "out" / "in" / "regions").glob("page_0001_r*.png"))
    r = cli("ocr", str(tmp_path / "in.png"), *common, "--task", "table", "--layout", "on")
    assert r.returncode == 2 and "--task text" in r.stderr
    (tmp_path / "bad.json").write_text(json.dumps({"label_tasks": {"table": "nope"}}))
    r = cli("ocr", str(tmp_path / "in.png"), *common, "--layout-settings", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "layout settings" in r.stderr and "Traceback" not in r.stderr
