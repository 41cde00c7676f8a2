#!/usr/bin/env python
"""Re-seed the method bugs of issue 18 one at a time in a scratch copy and run the tests that must catch them.

    python scripts/seed_bugs.py                 # all bugs, prints a markdown table
    python scripts/seed_bugs.py --only wire     # bugs whose name contains "wire"
    python scripts/seed_bugs.py --keep          # keep the scratch copies (to look at a survivor)

Each bug is an exact text replacement in one or more files (the script fails
if the text is not found: the code moved, update the bug). A bug in csrc/
rebuilds the native module in the copy (CPU only, DEVIT_CUDA=0, cmake as in
CMakeLists.txt). The copy holds the git-tracked files plus the native module,
so the working tree is never touched. A bug is "caught" when pytest exits
non-zero; the failing tests are listed. Not a CI step: run it after changing
the tests or the code they pin.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (description, [(file, old, new)], [test files])
BUGS = {
    "stage3-rel-not-backpropagated": (
        "stage 3 computes and logs the Q/K/V relation loss but leaves it out of the back-propagated loss",
        [("devit_ext/dekd/steps.py", "loss = (1 - alpha) * ce + alpha * kd + rel\n",
          "loss = (1 - alpha) * ce + alpha * kd + rel.detach()\n")],
        ["python_tests/test_method_dekd.py"],
    ),
    "stage4-patch-token": (
        "stage 4 matches the fused token against a patch token of the teacher instead of its class token",
        [("devit_ext/model.py", "return [feats[:, 0]] + ([feats[:, 1]] if distilled else [])",
          "return [feats[:, -1]] + ([feats[:, 1]] if distilled else [])")],
        ["python_tests/test_method_dekd.py"],
    ),
    "relation-weights-permuted-default": (
        "the paper's relation weights (0.2, 0.1, 0.3) permuted (the trainer's and the step's defaults)",
        [("devit_ext/dekd/trainer.py", "relation_weights: Sequence[float] = (0.2, 0.1, 0.3),",
          "relation_weights: Sequence[float] = (0.1, 0.2, 0.3),"),
         ("devit_ext/dekd/steps.py", "relation_weights: Sequence[float] = (0.2, 0.1, 0.3),",
          "relation_weights: Sequence[float] = (0.1, 0.2, 0.3),")],
        ["python_tests/test_method_dekd.py", "python_tests/test_method_training.py"],
    ),
    "relation-weights-permuted-order": (
        "the relation weights applied to the Q/K/V terms in another order (V, K, Q)",
        [("devit_ext/dekd/losses.py", "for w, xt, xs in zip(weights, split_qkv(qkv_teacher), split_qkv(qkv_student)):",
          "for w, xt, xs in zip(tuple(weights)[::-1], split_qkv(qkv_teacher), split_qkv(qkv_student)):")],
        ["python_tests/test_method_dekd.py"],
    ),
    "importance-keeps-least-important": (
        "importance ranking keeps the least important heads and neurons",
        [("devit_ext/decomposition.py", "order = torch.argsort(-scores.double(), stable=True)",
          "order = torch.argsort(scores.double(), stable=True)")],
        ["python_tests/test_method_importance.py", "python_tests/test_decompose.py::test_inherited_weights_are_exact_slices",
         "python_tests/test_decompose.py::test_fusion_map_init"],
    ),
    "missing-not-zeroed": (
        "missing= devices not zeroed in the fused forward",
        [("devit_ext/protocol.py", "tokens[i] = torch.zeros_like(tokens[i])", "tokens[i] = tokens[i]")],
        ["python_tests/test_missing_devices.py"],
    ),
    "wire-fields-swapped": (
        "two header fields of the wire message (device index, tokens per image) swapped in encode and decode",
        [("devit_ext/wire.py", "MAGIC, VERSION, kind, transfer_code, hash_bytes(model_hash), device, num_tokens, width,",
          "MAGIC, VERSION, kind, transfer_code, hash_bytes(model_hash), num_tokens, device, width,"),
         ("devit_ext/wire.py", "(magic, version, k, tcode, mhash, dev, T, d, bid, B, plen, compute_s, flags) = _HEADER.unpack(raw)",
          "(magic, version, k, tcode, mhash, T, dev, d, bid, B, plen, compute_s, flags) = _HEADER.unpack(raw)")],
        ["python_tests/test_wire_layout.py", "python_tests/test_distributed.py::test_wire_round_trip"],
    ),
    "cpp-tail-ties-away-from-zero": (
        "the C++ scalar tail rounds ties away from zero instead of to even",
        [("csrc/quant_cpu.cpp", "  return (t + kRoundMagic) - kRoundMagic;\n}", "  return std::round(t);\n}")],
        ["python_tests/test_rounding_ties.py"],
    ),
}


def tracked_copy(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        rel = f.decode()
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))
    for so in glob.glob(os.path.join(ROOT, "devit_ext", "_C*.so")):
        shutil.copy2(so, os.path.join(dst, "devit_ext"))


def apply(dst: str, edits) -> None:
    for rel, old, new in edits:
        p = os.path.join(dst, rel)
        text = open(p).read()
        if text.count(old) != 1:
            raise SystemExit(f"seed: {rel}: expected exactly one {old!r}, found {text.count(old)}; update the bug")
        with open(p, "w") as f:
            f.write(text.replace(old, new))


def rebuild_native(dst: str) -> None:
    import pybind11

    for so in glob.glob(os.path.join(dst, "devit_ext", "_C*.so")):
        os.remove(so)
    build = os.path.join(dst, "build", "cmake")
    env = dict(os.environ, DEVIT_CUDA="0")
    subprocess.run(["cmake", "-S", dst, "-B", build, f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={os.path.join(dst, 'devit_ext')}"],
                   check=True, env=env, capture_output=True)
    subprocess.run(["cmake", "--build", build, "-j", "2"], check=True, env=env, capture_output=True)


def run_tests(dst: str, tests: list[str]) -> tuple[int, list[str]]:
    env = dict(os.environ, PYTHONPATH=dst)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
                       cwd=dst, env=env,
                       capture_output=True, text=True)
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")]
    return r.returncode, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the bugs whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = ap.parse_args()
    rows = []
    for name, (what, edits, tests) in BUGS.items():
        if args.only not in name:
            continue
        dst = tempfile.mkdtemp(prefix=f"devit_seed_{name}_")
        try:
            tracked_copy(dst)
            apply(dst, edits)
            if any(rel.startswith("csrc/") for rel, _, _ in edits):
                rebuild_native(dst)
            code, failed = run_tests(dst, tests)
            caught = code != 0
            rows.append((name, what, caught, failed))
            print(f"{name}: {'caught' if caught else 'NOT CAUGHT'} ({len(failed)} failing) {failed[:4]}", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(dst, ignore_errors=True)
    print("\n| seeded bug | caught | failing tests (first 3) |\n|---|---|---|")
    for name, what, caught, failed in rows:
        print(f"| {what} | {'yes' if caught else '**no**'} | {', '.join(f'`{t}`' for t in failed[:3])} |")
    return 0 if all(r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
