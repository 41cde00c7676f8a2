"""`devit-ext export RUN --format onnx|executorch --out DIR`: one file per device + the fusion head.

Files are written to a temporary folder beside DIR, checked with the format's
runtime on real images from --data (or seeded random ones), and only then moved
to DIR; a parity failure is an error and leaves DIR untouched.
"""
from __future__ import annotations

import argparse
import os

from .. import run_dir as R
from ..run_dir import RunError
from . import add_config_flag, positive, require, settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory (after devit-ext train, or --model decomposed)")
    p.add_argument("--format", default=None, choices=("onnx", "executorch"))
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the files and manifest.json")
    p.add_argument("--model", default="trained", choices=("trained", "decomposed"))
    p.add_argument("--data", default=None, metavar="ROOT", help="ImageFolder root whose images check the files")
    p.add_argument("--split", default="val")
    p.add_argument("--check-images", type=int, default=32, help="images for the parity check (default 32)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed difference (x max(1, max |ref|))")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_config_flag(p)


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .. import export as E
    from ..imagefolder import as_tensors, load_split

    require(args, "format")
    require(args, "out")
    n_check = positive("check_images", args.check_images)
    E.require(args.format)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out) and not args.overwrite:
        raise RunError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
    rec = R.read_run(args.run)
    model = R.load_model(args.run, args.model)
    dcfg = rec["data_config"]
    if args.data:
        ds = load_split(args.data, args.split, dcfg, flag="--split")
        R.check_classes(rec, ds.classes, "--split")
        step = max(1, len(ds) // n_check)  # spread over the classes (files are in class order)
        idx = list(range(0, len(ds), step))[:n_check]
        images, _ = as_tensors(torch.utils.data.Subset(ds, idx), batch_size=64)
        source = f"{len(images)} images of {os.path.join(args.data, args.split)}"
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(n_check, model.in_chans, *model.img_size, generator=g)
        source = f"{n_check} seeded N(0, 1) images (no --data)"

    def fill(tmp):
        with tqdm(total=model.num_devices + 1, desc=f"export {args.format}") as bar:
            manifest = E.export_model(model, tmp, args.format, opset=args.opset, progress=bar)
        manifest["preprocess"] = E.preprocess(dcfg)
        manifest["class_names"] = rec.get("classes")
        for d in manifest["devices"]:
            if rec.get("classes"):
                d["class_names"] = [rec["classes"][c] for c in d["classes"]]
        parity = E.check_parity(model, tmp, manifest, images, atol=args.atol)
        parity["source"] = source
        manifest["parity"] = parity
        R.write_json(os.path.join(tmp, "manifest.json"), manifest)
        return manifest

    manifest = R.build_beside(out, fill)  # nothing reaches --out unless every file passed its parity check
    parity = manifest["parity"]
    for d in parity["devices"]:
        print(f"export: device {d['device']}: max |token - PyTorch| = {d['max_abs_diff']:.3g}")
    f = parity["fusion"]
    print(f"export: fusion: max |logits - PyTorch| = {f['max_abs_diff']:.3g}, top-1 agreement "
          f"{100 * f['top1_agreement']:.1f}% on {source}")
    print(f"export: wrote {out} ({len(manifest['devices'])} device files, fusion, manifest.json)")
    R.write_args(args.run, "export", settings(args))
    return 0
