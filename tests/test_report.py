"""`submit report RUN`: the page of a run folder, read back through headless Chromium's DOM, and its
PNG drawn by Chromium.

The run folder is made as a RotNet run on digits makes it, without the minutes of training: its
config.yaml composed by `submit pretrain`'s own code, TensorBoard event files written by TensorBoard's
writer with the tags a run logs (and a RotNet picture drawn by the method's own grid), the probe
results computed by the eval targets' own code on digits pixels, and fine-tune records.
tests/test_pretrain.py makes a report of a trained run too."""

from __future__ import annotations

import base64
import io
import json
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_submit
from selfsup.core.config_files import config_root, load_config
from selfsup.core.run_folder import write_run_config
from selfsup.report.screenshot import BOTTOM_MARGIN, END_MARK, end_mark_row, find_chromium, run_chromium
from selfsup.report.svg import COLOURS, round_ticks

STEPS = 20
SECTIONS = ("run", "scalars", "pictures", "evaluation", "config")
# the grid frames of RotNet's picture (selfsup/ssl/pictures.py): right and wrong predictions
GREEN, RED = (0, 160, 0), (200, 0, 0)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.fail("the report tests need Chromium: sudo apt-get install -y chromium (make system-test installs it)")
    return found


def rotnet_picture(step: int) -> np.ndarray:
    """A RotNet picture as the method draws it: digits in a captioned grid, framed green or red."""
    from sklearn.datasets import load_digits

    from selfsup.ssl.pictures import captioned_grid

    digits = torch.tensor(load_digits().images[step: step + 8], dtype=torch.float32) / 16
    images = digits[:, None].expand(-1, 3, -1, -1)
    ok = [(i + step) % 3 != 0 for i in range(8)]
    return captioned_grid(images, [f"p0 t{90 * (i % 4)}" for i in range(8)], ok=ok, columns=8)


def probe_record(cfg) -> dict:
    """probe.json as `submit probe RUN probe.layers=[1,4]` writes it, from digits pixels standing in
    for the backbone's features (stage1: the top half of each image)."""
    from omegaconf import OmegaConf
    from sklearn.datasets import load_digits

    from selfsup.eval.classification import ImageClassification, layer_row

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:600], dtype=torch.float32), torch.tensor(y[:600])
    target = ImageClassification()

    def scores(features):
        return target.evaluate({"train": {"all": (features[:500], y[:500])},
                                "test": {"all": (features[500:], y[500:])}}, cfg)

    record = scores(x)
    record["layers"] = [{"layer": "stage1", "module": "stages.0", **layer_row(scores(x[:, :32]))},
                        {"layer": "stage4", "module": "stages.3", **layer_row(record)}]
    # probe.baselines=true: coarser pixels stand in for the random init, the bottom half for raw pixels
    random_init = scores(x[:, ::4])
    random_init["layers"] = [{"layer": "stage1", "module": "stages.0", **layer_row(scores(x[:, :32:4]))},
                             {"layer": "stage4", "module": "stages.3", **layer_row(random_init)}]
    record["baselines"] = {"random_init": random_init, "pixels": scores(x[:, 32:])}
    record.update({"eval_target": "classification", "target": "runs/r", "global_step": STEPS - 1,
                   "precision": "32-true", "data": {"name": "digits"}, "probe": OmegaConf.to_container(cfg.probe)})
    return record


def ram_record(cfg) -> dict:
    """probe_atari_ram.json as the RAM probe writes it, on small random Breakout features."""
    from selfsup.eval.atari_ram import evaluate_ram

    rng = np.random.default_rng(0)
    ram = rng.integers(0, 4, (80, 128), dtype=np.uint8)
    ram[:, 84] = 0  # score: constant, listed but not in the mean
    features = torch.tensor(ram[:, 64:112], dtype=torch.float32) + 0.1 * torch.randn(80, 48)
    record = evaluate_ram({"Breakout": (features[:60], ram[:60], features[60:], ram[60:])}, cfg)
    record.update({"eval_target": "atari_ram", "global_step": STEPS - 1, "data": {"name": "atari_ram"}})
    return record


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from omegaconf import OmegaConf
    from torch.utils.tensorboard import SummaryWriter

    from selfsup.launch.config import compose

    run = tmp_path_factory.mktemp("runs") / "rotnet-convnet4-20261203-101500"
    write_run_config(run, compose("rotnet", "convnet4", ["data=digits", "trainer.max_steps=20"]))
    with SummaryWriter(str(run / "tb")) as tb:  # what Lightning's logger writes during training
        for step in range(STEPS):
            tb.add_scalar("train/loss", 1.4 - 0.05 * step + 0.02 * (step % 3), step)
            tb.add_scalar("train/rotation_acc", 0.25 + 0.03 * step, step)
            tb.add_scalar("train/images_per_sec", 150 + step % 4, step)
            tb.add_scalar("lr-Adam/decay", 1e-3 * step / STEPS, step)
            tb.add_scalar("lr-Adam/no_decay", 1e-3 * step / STEPS, step)
            tb.add_scalar("online_probe/top1", 0.1 + 0.02 * step, step)
            tb.add_scalar("epoch", 0, step)
        for step in (10, STEPS - 1):
            tb.add_image("rotnet/predicted_vs_true", rotnet_picture(step), step, dataformats="HWC")
    # a short probe: these numbers only have to reach the page
    cfg = OmegaConf.merge(load_config(config_root() / "probe.yaml"),
                          {"probe": {"max_iter": 10, "weight_decays": [1e-3]}})
    probe = probe_record(cfg)
    with SummaryWriter(str(run / "tb")) as tb:  # what `submit probe` adds, in a file of its own
        tb.add_scalar("probe/linear_top1", probe["linear"]["top1"], STEPS - 1)
    (run / "probe.json").write_text(json.dumps(probe, indent=1))
    (run / "probe_atari_ram.json").write_text(json.dumps(ram_record(cfg), indent=1))
    (run / "finetune.json").write_text(json.dumps(
        {"top1": 91.25, "top5": 99.5, "label_fraction": 1.0, "source": "runs/pretrained", "run": str(run),
         "baseline": {"top1": 80.5, "top5": 97.0}}))
    (run / "finetune").mkdir()
    (run / "finetune" / "a.json").write_text(json.dumps(
        {"top1": 70.0, "top5": 95.0, "label_fraction": 0.1, "source": str(run), "run": "runs/ft-10"}))
    (run / "finetune" / "b.json").write_text('{"top1": 7')  # cut short
    return run


class DomReader(HTMLParser):
    """The elements of a page by section: (tag, attributes) in document order, and each section's
    text; and the text of every <pre>."""

    def __init__(self, html: str):
        super().__init__()
        self.section = None
        self.elements: dict[str, list[tuple[str, dict]]] = {}
        self.text: dict[str, str] = {}
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("section", "header") and attrs.get("id"):
            self.section = attrs["id"]
        if tag == "pre":
            self._in_pre = True
            self.pre.append("")
        if self.section:
            self.elements.setdefault(self.section, []).append((tag, attrs))

    def handle_endtag(self, tag):
        if tag in ("section", "header"):
            self.section = None
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self.section:
            self.text[self.section] = self.text.get(self.section, "") + data + " "
        if self._in_pre:
            self.pre[-1] += data


def dump_dom(chromium: str, html: Path) -> str:
    """The page as Chromium parsed it."""
    with tempfile.TemporaryDirectory() as profile:
        done = run_chromium(chromium, html.resolve().as_uri(), Path(profile), "--dump-dom")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def test_report_page_read_by_chromium_and_its_png(run, chromium):
    proc = run_submit("report", run, check=True)
    html, png = run / "report.html", run / "report.png"
    assert proc.stdout.strip().splitlines() == [f"selfsup: wrote {html} and {png} (1200x{Image.open(png).height})"]
    dom = DomReader(dump_dom(chromium, html))
    assert [s for s in SECTIONS if s in dom.elements] == list(SECTIONS)
    assert "method rotnet · backbone convnet4 · data digits · last logged step 19" in dom.text["run"]

    # scalars: a chart per tag logged at every step, the learning rates of Adam in one chart
    scalars = dom.elements["scalars"]
    charts = [a["aria-label"] for t, a in scalars if t == "svg"]
    assert charts == ["train/loss", "train/images_per_sec", "train/rotation_acc", "lr-Adam", "online_probe/top1",
                      "epoch"]
    paths = [a["d"] for t, a in scalars if t == "path"]
    assert len(paths) == len(charts) + 1 and all(d.startswith("M") and d.count(" L") == STEPS - 1 for d in paths)
    assert "logged at one step" in dom.text["scalars"] and "probe/linear_top1" in dom.text["scalars"]

    # pictures: the last RotNet picture, as it was logged
    images = [a for t, a in dom.elements["pictures"] if t == "img"]
    assert len(images) == 1 and images[0]["alt"] == "rotnet/predicted_vs_true"
    assert images[0]["src"].startswith("data:image/png;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(images[0]["src"].split(",", 1)[1])))
    assert np.array_equal(np.asarray(shown.convert("RGB")), rotnet_picture(STEPS - 1))
    assert f"step {STEPS - 1}" in dom.text["pictures"]

    # evaluation: both probe results, the fine-tune records beside their random-init baselines
    probe = json.loads((run / "probe.json").read_text())
    evaluation = " ".join(dom.text["evaluation"].split())
    for number in (probe["linear"]["top1"], probe["knn"]["top1"], probe["layers"][0]["linear_top1"]):
        assert f"{number:.2f}" in evaluation
    ram = json.loads((run / "probe_atari_ram.json").read_text())
    assert "blocks_hit_count" in evaluation and f"{ram['mean_f1']:.3f}" in evaluation
    assert "constant in train: not in the mean" in evaluation
    # the probe beside its baselines, and the random init's row per layer
    base = probe["baselines"]
    best = max(base["random_init"]["linear"]["top1"], base["pixels"]["linear"]["top1"])
    assert (f"raw pixels {base['pixels']['linear']['top1']:.2f} {base['pixels']['knn']['top1']:.2f}" in evaluation
            and f"margin over the best baseline {probe['linear']['top1'] - best:+.2f}" in evaluation)
    stage1 = base["random_init"]["layers"][0]
    assert f"{probe['layers'][0]['weight_decay']:g} {stage1['linear_top1']:.2f} {stage1['knn_top1']:.2f}" in evaluation
    assert "this run runs/pretrained 100 % 91.25 99.50 80.50 97.00 +10.75" in evaluation
    assert "runs/ft-10 " + str(run) + " 10 % 70.00 95.00 – – –" in evaluation
    assert "finetune/b.json: not readable JSON" in evaluation

    # config: config.yaml as it is
    assert dom.pre == [(run / "config.yaml").read_text()]

    # the PNG: the whole page, 1200 wide, cut under its end mark; the charts' lines and the picture in it
    image = Image.open(png)
    assert image.width == 1200 and 2000 < image.height < 16384
    assert end_mark_row(image.convert("RGB")) == image.height - BOTTOM_MARGIN
    colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 24)}
    assert len(colours) > 50
    chart_blue = tuple(int(COLOURS[0][i: i + 2], 16) for i in (1, 3, 5))
    for colour in (chart_blue, GREEN, RED, END_MARK):
        assert colour in colours, colour


def test_png_of_the_requested_size_beside_the_page_named_by_o(run, chromium, tmp_path):
    page = tmp_path / "pages" / "rotnet.html"
    proc = run_submit("report", run, "-o", page, "--width", 1000, "--height", 1500, check=True)
    assert proc.stdout.strip() == f"selfsup: wrote {page} and {page.with_suffix('.png')} (1000x1500)"
    image = Image.open(page.with_suffix(".png"))
    assert image.size == (1000, 1500)
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50  # charts, not a blank page
    assert 'id="scalars"' in page.read_text()


def test_without_chromium_the_page_is_written_and_one_line_says_how_to_get_the_png(run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no chromium on the PATH
    page = tmp_path / "page.html"
    proc = run_submit("report", run, "-o", page)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"selfsup: wrote {page}; no PNG: it needs Chromium "
                                   "(sudo apt-get install -y chromium), or pass --no-png")
    assert page.is_file() and not page.with_suffix(".png").exists()
    proc = run_submit("report", run, "-o", tmp_path / "quiet.html", "--no-png", check=True)
    assert proc.stdout.strip() == f"selfsup: wrote {tmp_path / 'quiet.html'}"


def test_a_chromium_that_draws_nothing_leaves_the_page_and_one_line(run, tmp_path, monkeypatch):
    """A browser that cannot start (here a `chromium` that fails as one without a usable display or
    sandbox does): the page stays written, one line on stderr says why there is no PNG, exit 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text("#!/bin/sh\necho 'Failed to create a ProcessSingleton' >&2\nexit 21\n")
    (bin_dir / "chromium").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    page = tmp_path / "page.html"
    proc = run_submit("report", run, "-o", page)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == (f"selfsup: wrote {page}; no PNG: {bin_dir / 'chromium'} wrote no screenshot "
                                   "(exit 21; its last line: Failed to create a ProcessSingleton)")
    assert page.is_file() and not page.with_suffix(".png").exists()


def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = {
        (str(tmp_path / "missing"),): "does not exist",
        (str(tmp_path / "file.txt"),): "is not a folder",
        (str(not_a_run),): "is not a run folder (no config.yaml in it)",
        (str(run), "-o", str(tmp_path / "page.png")): "give the .html file to write",
        (str(run), "-o", str(tmp_path)): "a folder; give the .html file",
        (str(run), "-o", str(tmp_path / "p.html"), "--width", "10"): "--width 10: give a width",
        (str(run), "-o", str(tmp_path / "p.html"), "--height", "0"): "--height 0: give a height",
    }
    for args, message in cases.items():
        proc = run_submit("report", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("submit report: error: ") and message in lines[0], (args, lines)
        assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "not_a_run"]
    assert not any(not_a_run.iterdir())


def test_round_ticks_stay_in_range_at_round_steps():
    assert np.allclose(round_ticks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert np.allclose(round_ticks(-0.37, 12.4), [0, 5, 10])
    assert np.allclose(round_ticks(0.00104, 0.00216), [0.0012, 0.0014, 0.0016, 0.0018, 0.002])
    assert round_ticks(3.0, 3.0) == [3.0]
