"""Pictures of cost (hecompile inspect --plot, --plot-run) and progress in logs (executor.ProgressLog)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from hecompiler.cli import main
from hecompiler.executor import ProgressLog, total_work

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    hec = d / "tiny.hec"
    assert main([str(ROOT / "models/tiny_resnet_poly.onnx"), "-o", str(hec), "--ring", "8192", "-q"]) == 0
    from hecompiler.hecfile import load_hec

    prog, meta = load_hec(hec)
    return d, hec, prog, meta


def test_layer_costs_add_up_to_the_programs_prediction(tiny):
    from hecompiler.costmodel import CostModel, program_cost
    from hecompiler.plot import KINDS, layer_costs

    _, _, prog, meta = tiny
    model = CostModel()
    layers = layer_costs(prog, model)
    pc = program_cost(prog, model)
    total = sum(g["total"] for g in layers)
    assert total == pytest.approx(sum(pc.by_op.values()) + pc.encode_seconds, rel=1e-9)
    # every instruction lands in exactly one layer, in program order, with its level
    assert sum(g["instructions"] for g in layers) == len(prog.instrs)
    assert [lv for g in layers for lv in g["levels"]] == [i.level for i in prog.instrs]
    assert sum(len(g["refreshes"]) for g in layers) == prog.op_counts()["refresh"]
    convs = [g for g in layers if g["ops"].get("linear")]
    assert convs and all(g["rotate"] > 0 and g["mul_plain"] > 0 and g["encode"] > 0 for g in convs)
    assert all(g["refresh"] > 0 for g in layers if g["refreshes"])
    assert {k for k, _, _ in KINDS} <= set(layers[0])


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_inspect_plot_and_plot_run(tiny, capsys):
    pytest.importorskip("matplotlib")
    d, hec, prog, meta = tiny
    out = d / "cost.png"
    assert main(["inspect", str(hec), "--plot", str(out)]) == 0
    w, h = _png_size(out.read_bytes())
    assert w >= 1000 and h >= 600
    # a run's measurements beside the prediction: what `hecompile run --json` prints
    run = d / "run.json"
    assert main(["run", str(hec), "--input", str(ROOT / "models/tiny_resnet_poly.input.npy"), "--json", "-q"]) == 0
    run.write_text(capsys.readouterr().out)
    assert json.loads(run.read_text())["seconds_by_op"]
    out2 = d / "cost_run.png"
    assert main(["inspect", str(hec), "--plot", str(out2), "--plot-run", str(run)]) == 0
    w2, h2 = _png_size(out2.read_bytes())
    assert h2 > h  # a third panel
    # the picture is what matplotlib drew from the numbers: decode it and find the bar colours
    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(out.read_bytes()), format="png")[..., :3]
    for hex_colour in ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"):  # rotations, ct-pt, encoding, refresh
        rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(img - rgb).max(axis=2) < 0.02).sum() > 50, hex_colour


@pytest.mark.parametrize("argv, words", [
    (["--plot-run", "run.json"], "give --plot COST.png too"),
    (["--plot", "cost.svg"], "give a .png file name"),
    (["--plot", "cost.png", "--plot-run", "missing.json"], "--plot-run missing.json: no such file"),
    (["--plot", "cost.png", "--plot-run", "bad.json"], "no 'seconds_by_op' field"),
])
def test_plot_flags_are_checked_in_one_line(tiny, capsys, argv, words, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    d, hec, _, _ = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"backend": "seal"}')
    assert main(["inspect", str(hec), *argv]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "cost.png").exists()


def test_progress_lines_in_logs_with_percentage_and_eta():
    buf = io.StringIO()  # not a terminal: lines, not a bar
    t = [0.0]
    log = ProgressLog(200, "seal eval", stream=buf, interval=5.0)
    import hecompiler.executor as ex

    real = ex.time.monotonic
    try:
        ex.time.monotonic = lambda: t[0]
        log.t0 = log._last = 0.0
        for step in range(10):
            t[0] += 2.0  # 2 s per 20 units
            log(20)
        log.close()
    finally:
        ex.time.monotonic = real
    lines = buf.getvalue().splitlines()
    assert 3 <= len(lines) <= 5  # every 5 s of a 20 s run, and the last
    m = re.fullmatch(r"hecompile: seal eval: (\d+)% \((\d+)/200 work units\), ([\d.]+) s, ETA ([\d.]+) s", lines[0])
    assert m, lines[0]
    pct, done, el, eta = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert pct == done * 100 // 200 and eta == pytest.approx(el * (200 - done) / done, abs=0.1)
    assert lines[-1].startswith("hecompile: seal eval: 100% (200/200")


def test_progress_counts_work_units_of_a_real_run_and_stays_quiet_when_short(tiny):
    from hecompiler.backends.sim import Simulator

    _, _, prog, _ = tiny
    buf = io.StringIO()
    log = ProgressLog(total_work(prog), "sim", stream=buf, interval=3600)
    Simulator(prog).run({prog.inputs[0].name: np.zeros(prog.inputs[0].shape)}, progress=log)
    log.close()
    assert log.done == total_work(prog) > len(prog.instrs)  # units of work, not instructions
    assert buf.getvalue() == ""  # shorter than the interval: no line at all
    lin = next(i for i in prog.instrs if i.op == "linear")
    c = prog.linears[lin.plain.args[0]].counts
    assert c["rotate"] + c["mul_plain"] <= total_work(prog)


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    log = ProgressLog(10, "x", stream=s)
    assert log.bar is not None
    log(10)
    log.close()
    assert "hecompile: x:" not in s.getvalue()
