"""Demo DEKD / device-shape experiment (docs/demo-results.md, ninth try): `devit-ext demo` with one change.
    python scripts/demo_dekd_variant_experiment.py '{"dekd": {"distill_kind": "soft", "temperature": 4.0},
        "args": ["--seed", "3", "--threads", "1", "--cache-dir", "CACHE", "--quiet", "--json", "r.json"]}'
Keys (all optional but "args", the demo's command line):
  "dekd": fields that override demo.DEKD and demo.TINY_DEKD (train_dekd's arguments);
  "shape": an explicit shape for every device (replacing the demo's, or its searched ones), e.g. {"embed_dim": 48, "depth": 3, "num_heads": 1,
           "mlp_hidden": 80, "conv_channels": [6, 12]};
  "balanced": true for groups of C // N with the remainder spread (3/3/2/2) instead of the paper's chunks;
  "trajectory": true to train without val_data (each stage keeps its last epoch) and record every stage
           "ensemble" epoch's int8 accuracy on the validation and the test split (analysis only) as
           history["test_trajectory"] in the --json file.
"""
import json
import sys

from devit_ext import cli, decomposition, demo, partition
import devit_ext.dekd as dekd

cfg = json.loads(sys.argv[1])
demo.DEKD.update(cfg.get("dekd", {}))
demo.TINY_DEKD.update(cfg.get("dekd", {}))

if cfg.get("balanced"):
    paper_sizes = partition.group_sizes

    def group_sizes(C, N, weights=None):
        return [C // N + (i < C % N) for i in range(N)] if weights is None else paper_sizes(C, N, weights)

    partition.group_sizes = group_sizes

if cfg.get("shape"):
    searched = decomposition.decompose

    def decompose(teacher, n, budgets=None, **kw):
        return searched(teacher, n, budgets=[dict(cfg["shape"])] * n, **kw)

    decomposition.decompose = decompose

if cfg.get("trajectory"):
    trainer = dekd.train_dekd

    def train_dekd(model, teacher, train, val, **kw):
        from devit_ext import data as D
        from devit_ext.evaluate import accuracy

        args = cfg["args"]
        test = D.mnist5k(seed=int(args[args.index("--seed") + 1]) if "--seed" in args else 0).test
        seen = []

        def record(stage, epoch, rec):
            if stage == "ensemble":
                seen.append({"epoch": epoch, "val": accuracy(model, val, transfer="int8"),
                             "test_int8": accuracy(model, test, transfer="int8")})

        hist = trainer(model, teacher, train, None, callback=record, **kw)
        hist["test_trajectory"] = seen
        return hist

    dekd.train_dekd = train_dekd

sys.exit(cli.main(["demo"] + cfg["args"]))
