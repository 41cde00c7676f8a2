"""`devit-ext demo --tiny`: the whole pipeline in seconds, its --json and --plot output, the teacher cache."""
import json

import pytest

from devit_ext import cli


def test_demo_tiny_json_plot_and_cache(tmp_path, capsys):
    js, png, cache = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "cache"
    argv = ["demo", "--tiny", "--quiet", "--threads", "1", "--json", str(js), "--plot", str(png),
            "--cache-dir", str(cache)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "DeViT int8" in out and "device 0 missing" in out
    r = json.loads(js.read_text())
    for k in ("teacher_acc", "devit_acc_fp32", "devit_acc_int8", "acc_one_device_missing"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["num_devices"] == 4 and len(r["device_flops"]) == 4
    assert sum(r["device_flops"]) <= 0.4 * r["teacher_flops"]
    assert r["bytes_per_image"] == [w + 4 for w in r["widths"]]  # int8 token + fp32 scale
    assert r["bytes_per_image_fp32"] == [4 * w for w in r["widths"]]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert r["seconds"]["teacher_cached"] is False

    # the second run loads the cached teacher (same accuracy, no training)
    assert cli.main(argv[:-4] + ["--json", str(js), "--cache-dir", str(cache), "--devices", "2"]) == 0
    r2 = json.loads(js.read_text())
    assert r2["seconds"]["teacher_cached"] is True and r2["teacher_acc"] == r["teacher_acc"]
    assert r2["num_devices"] == 2 and len(r2["bytes_per_image"]) == 2


def test_demo_rejects_bad_arguments(capsys):
    assert cli.main(["demo", "--tiny", "--devices", "0", "--no-cache"]) == 2
    assert "--devices" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "tpu"])
