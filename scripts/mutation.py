#!/usr/bin/env python
"""Mutation testing of the core modules with mutmut (run on demand; not a CI step).

    pip install "mutmut==3.8.1"                  # or: pip install -e .[mutation]
    python scripts/mutation.py wire              # one group
    python scripts/mutation.py wire dekd ops     # several, one after the other
    python scripts/mutation.py --list            # the groups, their code and their tests
    python scripts/mutation.py --rerun /tmp/devit_mutation_wire_XXXX   # its survivors again, with today's tests

Each group names the source files to mutate (optionally only some functions,
by mutmut's mutant-name globs) and the test files that pin them; only those
tests run, and mutmut runs for each mutant only the tests that executed the
mutated function (its coverage-based selection), so a group finishes on a
2-core machine. Work happens in a scratch copy (git-tracked files plus the
native module) with its own setup.cfg: the working tree is never touched.
The scratch copy is kept (path printed) so `mutmut show NAME` can be run in it.
Results: per group, killed / survived / other counts and every survivor's
diff, written to <scratch>/survivors.md. docs/testing.md records the last run
and why each survivor is equivalent or which test now kills it.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT_VERSION = "3.8.1"
SUPPORT = ["python_tests/conftest.py", "python_tests/_agreement.py"]

# group -> (files to mutate, mutant-name globs or [] for all, test files, extra pytest args)
GROUPS = {
    "wire": (["devit_ext/wire.py"], [],
             ["python_tests/test_wire_layout.py", "python_tests/test_wire_errors.py"], []),
    # ops reference and dispatch (the modules issue 18 names); checks.py (argument checking) is not scored.
    # torch.compile cannot trace mutmut's trampolines (the clean run fails): the compile tests are left out
    "ops": (["devit_ext/ops/reference.py", "devit_ext/ops/dispatch.py"], [],
            ["python_tests/test_quant_ops.py", "python_tests/test_rounding_ties.py",
             "python_tests/test_attention_oracle.py", "python_tests/test_reference_ops.py",
             "python_tests/test_dispatch_paths.py"],
            ["-k", "not compile"]),
    "ops_quant": (["devit_ext/ops/quant.py"], [],
                  ["python_tests/test_quant_ops.py", "python_tests/test_rounding_ties.py",
                   "python_tests/test_attention_oracle.py", "python_tests/test_reference_ops.py"],
                  ["-k", "not compile"]),
    "dekd": (["devit_ext/dekd/losses.py", "devit_ext/dekd/steps.py", "devit_ext/protocol.py"],
             ["devit_ext.dekd.*", "devit_ext.protocol.x_fused_forward*", "devit_ext.protocol.x_int8_roundtrip*",
              "devit_ext.protocol.x_fake_quant_int8*"],
             ["python_tests/test_method_dekd.py", "python_tests/test_method_dekd_details.py",
              "python_tests/test_missing_devices.py"], []),
    "pruning": (["devit_ext/decomposition.py", "devit_ext/importance.py"],
                ["devit_ext.decomposition.x_top_units*", "devit_ext.decomposition.x_choose_units*",
                 "devit_ext.decomposition.x__expand_heads*", "devit_ext.decomposition.x_prune*",
                 "devit_ext.decomposition.x_init_fusion*", "devit_ext.importance.x_magnitude*",
                 "devit_ext.importance.x_reduce_axis*", "devit_ext.importance.x__accumulate*",
                 "devit_ext.importance.x_param_axes*", "devit_ext.importance.x__unit_key*"],
                ["python_tests/test_method_importance.py", "python_tests/test_magnitude_formula.py",
                 "python_tests/test_decompose.py"],
                ["-k", "test_method_importance or test_magnitude_formula or exact_slices or pruning_nothing or fusion_map_init "
                       "or distilled_tokens or variant_teacher"]),
    "stacked": (["devit_ext/engines/stacked.py"], ["devit_ext.engines.stacked.x_fold_submodel*",
                                                   "devit_ext.engines.stacked.x_shape_signature*"],
                ["python_tests/test_collaborate_local.py"], ["-k", "fp32_transfer_exact or int8_transfer_agrees"]),
    # the trainers' pure parts: seeding, shifts, lr schedule, AdamW groups, argument checks, epoch plans,
    # the optimizer step, recipes, DEKD's settings, the epoch record (not resolve_device / autocast: CUDA only)
    "trainer": (["devit_ext/training/common.py", "devit_ext/training/sampling.py", "devit_ext/training/stepper.py",
                 "devit_ext/training/recipe.py", "devit_ext/dekd/config.py", "devit_ext/dekd/stages.py"],
                [f"devit_ext.training.common.x_{f}*" for f in ("generator", "seed_everything", "random_shift",
                                                              "cosine_lr", "param_groups", "real", "count")]
                + ["devit_ext.training.sampling.*", "devit_ext.training.stepper.*", "devit_ext.training.recipe.*",
                   "devit_ext.dekd.config.*", "devit_ext.dekd.stages.x_epoch_record*"],
                ["python_tests/test_training_schedule.py", "python_tests/test_training_setup.py",
                 "python_tests/test_trainer_wiring.py", "python_tests/test_training_args.py",
                 "python_tests/test_method_training.py", "python_tests/test_training_recipe.py",
                 "python_tests/test_dekd.py"], []),
    # what train_dekd hands each epoch (the epochs replaced by spies in test_trainer_wiring)
    "trainer_loop": (["devit_ext/dekd/trainer.py"], ["devit_ext.dekd.trainer.x__train*"],
                     ["python_tests/test_trainer_wiring.py", "python_tests/test_trainer_runs.py",
                      "python_tests/test_training_args.py",
                      "python_tests/test_method_training.py", "python_tests/test_training_recipe.py",
                      "python_tests/test_dekd.py"], []),
}
# groups whose tests run OpenMP with several threads (test_threads_agree): a worker forked from mutmut's main
# process, which already ran them, deadlocks in libgomp (every such mutant timed out); mutmut's fork server
# forks the workers from a process that has only collected the tests
FORKSERVER = {"ops", "ops_quant"}


def scratch_copy(dst: str, tests: list[str]) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    keep_tests = set(tests) | set(SUPPORT)
    for f in files:
        rel = f.decode()
        if not rel or (rel.startswith("python_tests/") and rel not in keep_tests):
            continue
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))
    for rel in tests + SUPPORT:  # new, not yet committed test files too
        if os.path.isfile(os.path.join(ROOT, rel)):
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))
    for so in glob.glob(os.path.join(ROOT, "devit_ext", "_C*.so")):
        shutil.copy2(so, os.path.join(dst, "devit_ext"))
    # setup.py installs kernels/ as devit_ext.kernels (package_dir); mutmut imports devit_ext from its copy
    shutil.copytree(os.path.join(dst, "kernels"), os.path.join(dst, "devit_ext", "kernels"))


def write_config(dst: str, files: list[str], tests: list[str], extra: list[str], forkserver: bool = False) -> None:
    def block(vals):
        return "".join(f"\n    {v}" for v in vals)

    with open(os.path.join(dst, "setup.cfg"), "w") as f:
        f.write("[mutmut]\nsource_paths = devit_ext\n")
        f.write(f"only_mutate ={block(files)}\n")
        f.write(f"also_copy ={block(['python_tests'])}\n")
        f.write(f"pytest_add_cli_args_test_selection ={block(tests)}\n")
        f.write(f"pytest_add_cli_args ={block(['-p', 'no:cacheprovider', '-m', 'not slow', *extra])}\n")
        if forkserver:
            f.write("process_isolation = forkserver\n")


def mutmut(dst: str, *args: str, check=True) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=dst, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"mutmut {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def run_group(name: str, children: int) -> dict:
    files, globs, tests, extra = GROUPS[name]
    dst = tempfile.mkdtemp(prefix=f"devit_mutation_{name}_")
    scratch_copy(dst, tests)
    write_config(dst, files, tests, extra, forkserver=name in FORKSERVER)
    with open(os.path.join(dst, "mutation_group"), "w") as f:
        f.write(name)
    print(f"[{name}] scratch copy {dst}", flush=True)
    mutmut(dst, "run", "--max-children", str(children), *globs)
    return summarize(name, dst)


def rerun_group(dst: str, children: int) -> dict:
    """Re-run the not-killed mutants of an earlier run in its scratch copy `dst`, with the group's test
    files as they are now in the working tree (mutmut collects coverage for the tests that are new)."""
    base = os.path.basename(os.path.normpath(dst))
    names = sorted((g for g in GROUPS if base.startswith(f"devit_mutation_{g}_")), key=len)  # ops < ops_quant
    if os.path.isfile(os.path.join(dst, "mutation_group")):
        with open(os.path.join(dst, "mutation_group")) as f:
            names = [f.read().strip()]
    if not names or names[-1] not in GROUPS or not os.path.isfile(os.path.join(dst, "setup.cfg")):
        raise SystemExit(f"mutation: --rerun expects a scratch copy made by this script, got {dst!r}")
    name = names[-1]
    tests = GROUPS[name][2]
    for rel in tests + SUPPORT:
        if os.path.isfile(os.path.join(ROOT, rel)):
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))
    before = summarize(name, dst, write=False)
    todo = [k for k, st in before["status"].items() if st != "killed"]
    print(f"[{name}] re-running {len(todo)} not-killed mutants in {dst}", flush=True)
    if todo:
        mutmut(dst, "run", "--max-children", str(children), *todo)
    return summarize(name, dst)


def summarize(name: str, dst: str, write: bool = True) -> dict:
    globs = GROUPS[name][1]
    results = mutmut(dst, "results", "--all", "true", check=False)
    status: dict[str, str] = {}
    for line in results.splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if m and (not globs or any(re.fullmatch(g.replace(".", r"\.").replace("*", ".*"), m.group(1)) for g in globs)):
            status[m.group(1)] = m.group(2).strip()
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    survivors = sorted(k for k, s in status.items() if s == "survived")
    if not write:
        return {"group": name, "counts": counts, "survivors": survivors, "dir": dst, "status": status}
    with open(os.path.join(dst, "survivors.md"), "w") as f:
        for k in survivors:
            diff = [ln for ln in mutmut(dst, "show", k, check=False).splitlines() if ln.startswith(("-", "+"))
                    and not ln.startswith(("---", "+++"))]
            f.write(f"### {k}\n```diff\n" + "\n".join(diff) + "\n```\n")
    killed = counts.get("killed", 0)
    total = sum(counts.values())
    print(f"[{name}] {total} mutants: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + (f"; killed {killed / total:.1%}" if total else "") + f"; survivors in {dst}/survivors.md", flush=True)
    return {"group": name, "counts": counts, "survivors": survivors, "dir": dst, "status": status}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", help=f"groups to run: {', '.join(GROUPS)} (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (default 2)")
    ap.add_argument("--rerun", metavar="SCRATCH", help="re-run the not-killed mutants of an earlier run (its scratch "
                    "copy, as printed) with the group's tests as they are now")
    args = ap.parse_args()
    if args.list:
        for k, (files, globs, tests, _) in GROUPS.items():
            print(f"{k}: {', '.join(files)}{' (' + ', '.join(globs) + ')' if globs else ''} <- {', '.join(tests)}")
        return 0
    try:
        import mutmut as _m  # noqa: F401
    except ImportError:
        raise SystemExit(f"mutation: needs mutmut: pip install 'mutmut=={MUTMUT_VERSION}' (or pip install -e .[mutation])")
    if args.rerun:
        if args.groups:
            raise SystemExit("mutation: --rerun takes the scratch copy only (its group is in its name)")
        rerun_group(args.rerun, args.max_children)
        return 0
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"mutation: unknown group(s) {unknown}; groups are {list(GROUPS)}")
    for g in args.groups or list(GROUPS):
        run_group(g, args.max_children)
    return 0


if __name__ == "__main__":
    sys.exit(main())
