"""The hecompile command line: outputs, listing, errors, exit codes, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import hecompiler as hc
from hecompiler.cli import main
from conftest import ort_run, rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.onnx"
    onnx.save(models.MODELS["tiny_resnet"](), path)
    return path


def test_emit_ir_dot_onnx(tiny, tmp_path, capsys):
    assert main([str(tiny), "-o", str(tmp_path / "t.ir")]) == 0
    err = capsys.readouterr().err
    assert "fold-bn" in err and "BatchNormalization -" in err and "wrote" in err
    g = hc.parse_graph((tmp_path / "t.ir").read_text())
    assert "BatchNormalization" not in g.op_counts()
    assert main([str(tiny), "-o", str(tmp_path / "t.dot"), "-q"]) == 0
    assert (tmp_path / "t.dot").read_text().startswith("digraph")
    assert main([str(tiny), "-o", str(tmp_path / "s.dot"), "--select", "/layer2/*", "-q"]) == 0
    part = (tmp_path / "s.dot").read_text()
    assert "<br/>%/layer2/" in part and "<br/>%/layer1/" not in part  # only layer2's nodes are drawn
    assert all("from %" in line for line in part.splitlines() if "layer1" in line)  # layer1 inputs: stand-ins
    capsys.readouterr()
    assert main([str(tiny), "-o", str(tmp_path / "s.ir"), "--select", "/layer2/*", "-q"]) == 1
    assert "--select shapes a picture: it needs a .dot output" in capsys.readouterr().err
    assert main([str(tiny), "-o", str(tmp_path / "n.dot"), "--no-constants", "-q"]) == 0
    assert "elems" not in (tmp_path / "n.dot").read_text()
    assert not (tmp_path / "s.ir").exists()
    assert main([str(tiny), "-o", str(tmp_path / "t.onnx"), "-q"]) == 0
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    assert rel_err(ort_run(onnx.load(tmp_path / "t.onnx"), x)[0], ort_run(onnx.load(tiny), x)[0]) < 1e-4


def test_ir_to_stdout_and_custom_pipeline(tiny, capsys):
    assert main([str(tiny), "--passes", "", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph ") and "BatchNormalization(" in out


def test_passes_listing(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-bn" in out and "exact" in out and "default pipeline:" in out


def test_user_plugin_pass_from_a_file(tiny, tmp_path, capsys):
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "import hecompiler as hc\n"
        "@hc.register_pass\n"
        "@dataclass(frozen=True)\n"
        "class CountConvs(hc.Pass):\n"
        "    name = 'count-convs'\n"
        "    summary = 'count the convolutions'\n"
        "    exact = True\n"
        "    def run(self, graph, ctx):\n"
        "        n = sum(x.op == 'Conv' for x in graph.nodes)\n"
        "        return hc.PassResult(False, [f'{n} convolutions'])\n")
    assert main(["passes", "--plugin", str(plugin)]) == 0
    assert "count-convs" in capsys.readouterr().out
    assert main([str(tiny), "--plugin", str(plugin), "--passes", "fold-bn,count-convs", "-o",
                 str(tmp_path / "x.ir")]) == 0
    assert "6 convolutions" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "missing.onnx: no such file"),
    (["{tiny}", "-o", "{tmp}/out.xyz"], "cannot tell the output kind from '.xyz'"),
    (["{tiny}", "--emit", "onnx"], "--emit onnx needs -o"),
    (["{tiny}", "--passes", "nope", "-o", "{tmp}/out.ir"], "unknown pass 'nope'"),
    (["{tiny}", "--input-shape", "nope=1,1,8,8", "-o", "{tmp}/out.ir"], "unknown input"),
    (["{tiny}", "-o", "{tmp}/no/such/dir/out.ir"], "does not exist"),
    (["{tiny}", "--plugin", "{tmp}/nothere.py"], "nothere.py: no such file"),
])
def test_errors_exit_nonzero_with_one_line_and_no_file(tiny, tmp_path, capsys, args, message):
    args = [a.format(tiny=tiny, tmp=tmp_path) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("hecompile: error: ") and message in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_bad_layout_strategy_is_refused_before_any_work(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tiny), "-o", str(tmp_path / "x.hec"), "--layout", "polyphase:3"])
    assert e.value.code == 2
    assert "the phase bound K of polyphase:K must be a power of two >= 2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_failed_run_keeps_the_old_output(tiny, tmp_path, capsys):
    out = tmp_path / "keep.ir"
    out.write_text("old")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    assert main([str(bad), "-o", str(out)]) == 1
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "keep.ir"]


def test_console_script_help_and_exit_code(tiny, tmp_path):
    exe = Path(sys.executable).with_name("hecompile")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Compile an ONNX CNN" in r.stdout and "--input-shape" in r.stdout
    r = subprocess.run([str(exe), str(tmp_path / "none.onnx")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0


# --------------------------------------------------------------------------- the encrypted path

@pytest.fixture(scope="module")
def tiny_poly(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("hec")
    path = d / "tiny_poly.onnx"
    onnx.save(models.MODELS["tiny_resnet_poly"](), path)
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.save(d / "x.npy", x)
    assert main([str(path), "-o", str(d / "m.hec"), "-q"]) == 0
    return d, path, x


def test_compile_report_names_parameters_and_security(models, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(models.MODELS["tiny_resnet_poly"](), path)
    assert main([str(path), "-o", str(tmp_path / "m.hec"), "--ring", "8192"]) == 0
    err = capsys.readouterr().err
    assert "128-bit (HE standard" in err and "N=8192" in err and "refreshes" in err
    assert "rotations" in err and "Galois keys" in err and "predicted per inference:" in err and "argmax agrees" in err
    assert "predicted once per key set: keygen" in err and "cost table: the bundled table" in err
    # a server keeps all of the tiny CNN's plaintexts: after the first, an inference encodes nothing
    from hecompiler.hecfile import load_hec

    r = load_hec(tmp_path / "m.hec")[1]["report"]
    pt = r["plaintexts"]
    assert pt["served_cache_bytes"] == pt["bytes_all"] > 0
    # a serving worker evaluates alone: the helpers' share is back in its time, all its encoding kept
    assert r["predicted_served_seconds"] == pytest.approx(
        r["predicted_seconds"] + r["predicted_shared_seconds"] - pt["encode_seconds"], abs=2e-3)
    assert "served ('hecompile serve'): " in err and "100% of its plaintexts kept across requests" in err


def test_run_sim_and_seal_match_onnxruntime(tiny_poly, capsys):
    d, path, x = tiny_poly
    ref = ort_run(onnx.load(path), x)[0]
    for backend in ("sim", "seal"):
        assert main(["run", str(d / "m.hec"), "--input", str(d / "x.npy"), "--backend", backend,
                     "--reference", str(path), "-o", str(d / f"y_{backend}.npy"), "-q"]) == 0
        out = capsys.readouterr().out
        assert "argmax agrees" in out
        y = np.load(d / f"y_{backend}.npy")
        assert np.abs(y - ref).max() <= 1e-3 * np.ptp(ref)


def test_inspect(tiny_poly, capsys):
    d, _, _ = tiny_poly
    assert main(["inspect", str(d / "m.hec")]) == 0
    out = capsys.readouterr().out
    assert "tiny_poly.onnx" in out and "linear" in out
    assert main(["inspect", str(d / "m.hec"), "--program-text"]) == 0
    assert capsys.readouterr().out.startswith("heprogram v1 {")


def test_client_and_server_as_separate_commands(tiny_poly, tmp_path, capsys):
    d, path, x = tiny_poly
    hec = str(d / "m.hec")
    client, server = tmp_path / "client", tmp_path / "server"
    assert main(["keygen", hec, "--client-dir", str(client), "--server-dir", str(server)]) == 0
    assert (client / "secret.key").exists() and not (server / "secret.key").exists()
    assert main(["encrypt", hec, "--keys", str(client), "--input", str(d / "x.npy"), "-o", str(tmp_path / "x.b")]) == 0
    st = str(tmp_path / "st.b")
    args = ["eval", hec, "--keys", str(server), "--state", st, "-o", str(tmp_path / "y.b")]
    assert main(args + ["--input", str(tmp_path / "x.b")]) == 0
    rounds = 0
    while not (tmp_path / "y.b").exists():
        assert "refresh needed" in capsys.readouterr().out
        assert main(["refresh", hec, "--keys", str(client), "--request", st + ".request", "-o", st + ".response"]) == 0
        assert main(args + ["--response", st + ".response"]) == 0
        rounds += 1
        assert rounds < 50
    assert main(["decrypt", hec, "--keys", str(client), "--ciphertext", str(tmp_path / "y.b"),
                 "-o", str(tmp_path / "y.npy")]) == 0
    ref = ort_run(onnx.load(path), x)[0]
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= 1e-3 * np.ptp(ref)


@pytest.mark.parametrize("args, message", [
    (["run", "{hec}", "--input", "{d}/nope.npy"], "nope.npy: no such file"),
    (["run", "{hec}", "--input", "{d}/bad.npy"], "shape [1, 1, 4, 4] but the program's input"),
    (["run", "{d}/x.npy", "--input", "{d}/x.npy"], "x.npy"),
    (["{onnx}", "-o", "{d}/m2.hec", "--max-memory", "1M"], "no parameter set fits"),
    (["{onnx}", "-o", "{d}/m2.hec", "--ring", "1024"], "ring degree"),
    (["{d}/relu.onnx", "-o", "{d}/m2.hec"], "cannot run Relu under encryption"),
])
def test_encrypted_path_errors(tiny_poly, models, args, message, capsys):
    d, path, _ = tiny_poly
    np.save(d / "bad.npy", np.zeros((1, 1, 4, 4), np.float32))
    onnx.save(models.MODELS["tiny_resnet"](), d / "relu.onnx")
    before = sorted(p.name for p in d.iterdir())
    args = [a.format(hec=d / "m.hec", d=d, onnx=path) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("hecompile: error: ") and message in err, err
    assert sorted(p.name for p in d.iterdir()) == before
