"""What both trainers (DEKD and the teacher's) share: data streaming, epoch plans, torchrun, recipes, stepping.

- `source`: in-memory tensors or any Dataset streamed through a DataLoader; labels; batch checks;
- `sampling`: per-epoch plans, the same on every process, sharded by rank;
- `dist`: the torchrun process group, gradient averaging, reduced metrics, lost-peer errors;
- `recipe`: "light" and "deit" (timm's Mixup, SoftTargetCrossEntropy, ModelEmaV3, DeiT's lr rule);
- `stepper`: one optimizer step (accumulation, averaging, clipping, lr, EMA);
- `common`: device, autocast, seeding, pixel shifts, the cosine schedule, AdamW groups.
"""
