"""Demo teacher experiments (docs/demo-results.md, fifth to seventh tries): the demo's ViT alone, distilled
from a small CNN (fifth), with its patch embedding / position embedding initialised from the data (sixth),
or fed shifted copies of the image as extra channels and per-image affine transforms (seventh).

All in one loop with train_teacher's light-recipe settings (train_teacher itself has no distillation term).
    python scripts/demo_teacher_kd_experiment.py '{"kd": "cnn", "data_seed": 1}'
    python scripts/demo_teacher_kd_experiment.py '{"patch_init": "pca", "pos_init": "sincos"}'
    python scripts/demo_teacher_kd_experiment.py '{"spt": 3, "affine": [10, 0.1, 2]}'
prints one RESULT line of JSON (test/val accuracy, val accuracy per epoch, wall and CPU seconds).
"""
import json, sys, time, resource
import torch, torch.nn as nn, torch.nn.functional as F
from devit_ext import data as D
from devit_ext.demo import TEACHERS, TEACHER_TRAIN
from devit_ext.teacher import build_teacher
from devit_ext.training import common as U

cfg = dict(TEACHER_TRAIN, seed=0, data_seed=0, threads=1,
           kd=None, kd_w=0.5, T=4.0, cnn_epochs=15, cnn_lr=3e-3, distilled=False, hard=False, cnn_width=32,
           patch_init=None, pos_init=None, shift_ramp=0, spt=0, affine=None)
cfg.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
torch.set_num_threads(cfg["threads"])
sp = D.mnist5k(seed=cfg["data_seed"])
Xtr, Ytr = sp.train.images, sp.train.labels

def cnn(w):
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * 49, 128), nn.ReLU(), nn.Linear(128, 10))

@torch.no_grad()
def acc(m, ds):
    m.eval(); z = m(ds.images)
    if isinstance(z, tuple): z = (z[0] + z[1]) / 2
    m.train(); return float((z.argmax(-1) == ds.labels).float().mean())

def shift_at(ep):
    """Pixel shifts of epoch ep: cfg["shift"], or with shift_ramp R, shift * ep // R up to it (0 at first)."""
    r = cfg["shift_ramp"]
    return cfg["shift"] if not r else min(cfg["shift"], cfg["shift"] * ep // r)

def batch_affine(x, deg, scale, px, g):
    """Each image its own rotation (+-deg), scale (1 +- scale) and translation (+-px, continuous), one
    affine_grid + grid_sample for the batch (bilinear, zero fill)."""
    B, _, H, W = x.shape
    u = lambda: torch.rand(B, generator=g) * 2 - 1
    a, s = u() * deg * torch.pi / 180, 1 + u() * scale
    tx, ty = u() * 2 * px / W, u() * 2 * px / H
    th = torch.stack([torch.stack([a.cos() / s, -a.sin() / s, tx], -1),
                      torch.stack([a.sin() / s, a.cos() / s, ty], -1)], 1)
    return F.grid_sample(x, F.affine_grid(th, x.shape, align_corners=False), align_corners=False)


def train(model, epochs, lr, kd_model=None):
    torch.manual_seed(cfg["seed"])
    opt = torch.optim.AdamW(U.param_groups([model], 0.05), lr=lr)
    spe = -(-len(Ytr) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * spe, pct_start=0.2,
                                                div_factor=25, final_div_factor=1e3)
    best, best_state, log = -1, None, []
    for ep in range(epochs):
        g = U.generator(cfg["seed"], 7, ep)
        perm = torch.randperm(len(Ytr), generator=g)
        for i in range(0, len(Ytr), cfg["batch_size"]):
            idx = perm[i:i + cfg["batch_size"]]
            if cfg["affine"]:  # [degrees, scale, px]
                x = batch_affine(Xtr[idx], *cfg["affine"], g)
            else:
                x = U.random_shift(Xtr[idx], shift_at(ep), g)
            y = Ytr[idx]
            out = model(x)
            if kd_model is None:
                z = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
                loss = F.cross_entropy(z, y)
            else:
                with torch.no_grad():
                    zt = kd_model(x)
                zc, zd = out if isinstance(out, tuple) else (out, out)
                if cfg["hard"]:
                    lkd = F.cross_entropy(zd, zt.argmax(-1))
                else:
                    T = cfg["T"]
                    lkd = F.kl_div(F.log_softmax(zd / T, -1), F.log_softmax(zt / T, -1), reduction="batchmean",
                                   log_target=True) * T * T
                loss = (1 - cfg["kd_w"]) * F.cross_entropy(zc, y) + cfg["kd_w"] * lkd
            opt.zero_grad(set_to_none=True); loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        va = acc(model, sp.val)
        if va > best:
            best, best_state = va, {k: v.clone() for k, v in model.state_dict().items()}
        log.append(round(va, 3))
    model.load_state_dict(best_state); model.eval()
    return best, log

t0 = time.time()
res = dict(cfg=cfg)
kd_model = None
if cfg["kd"] == "cnn":
    c = cnn(cfg["cnn_width"])
    bv, _ = train(c, cfg["cnn_epochs"], cfg["cnn_lr"])
    res.update(cnn_val=bv, cnn_test=acc(c, sp.test), cnn_s=round(time.time() - t0, 1))
    print("cnn", res, flush=True)
    kd_model = c.eval()


class ShiftedCopies(nn.Module):
    """Shifted patch tokenisation's input side (Lee et al. 2021, "ViT for small-size datasets"): the image
    and four copies shifted diagonally by `s` px (zero fill) as channels, so each 7-px patch also sees
    its neighbours' borders; the patch embedding stays a linear map (in_chans 5)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        s, (H, W) = self.s, x.shape[-2:]
        p = F.pad(x, (s, s, s, s))
        cops = [p[..., dy: dy + H, dx: dx + W] for dy, dx in ((0, 0), (0, 2 * s), (2 * s, 0), (2 * s, 2 * s))]
        return torch.cat([x] + cops, 1)


TEACHER = TEACHERS["vit"]  # these tries are about the plain ViT
arch = dict(TEACHER, in_chans=5) if cfg["spt"] else TEACHER
vit = build_teacher(**arch, distilled=cfg["distilled"], seed=cfg["seed"])
if cfg["spt"]:
    vit = nn.Sequential(ShiftedCopies(cfg["spt"]), vit)


@torch.no_grad()
def init_patch_pca(vit, X, eps=1e-2):
    """Patch embedding = whitened PCA of the training patches, mixed into embed_dim channels by a random
    orthonormal map (seeded), each channel ~unit variance; bias centres the patches."""
    proj = vit.patch_embed.proj
    k = proj.kernel_size[0]
    P = F.unfold(X, k, stride=k).transpose(1, 2).reshape(-1, X.shape[1] * k * k)  # (M, C k k)
    mu = P.mean(0)
    lam, V = torch.linalg.eigh(torch.cov((P - mu).T))
    Wh = (V / (lam + eps).sqrt()).T  # (Ckk, Ckk): rows whiten
    g = torch.Generator().manual_seed(cfg["seed"])
    R, _ = torch.linalg.qr(torch.randn(proj.out_channels, Wh.shape[0], generator=g))  # orthonormal columns
    W = R @ Wh * (proj.out_channels / Wh.shape[0]) ** 0.5
    proj.weight.copy_(W.reshape(proj.weight.shape)); proj.bias.copy_(-W @ mu)


@torch.no_grad()
def init_pos_sincos(vit):
    """Fixed-form 2-D sine-cosine table (as MAE's) as the starting position embedding; prefix rows zero."""
    from timm.layers import build_sincos2d_pos_embed

    gh, gw = vit.patch_embed.grid_size
    pe = build_sincos2d_pos_embed((gh, gw), vit.embed_dim)  # (gh gw, d)
    npre = vit.pos_embed.shape[1] - gh * gw
    vit.pos_embed[0, npre:].copy_(pe)
    vit.pos_embed[0, :npre].zero_()


if cfg["patch_init"] == "pca" and not cfg["spt"]:
    init_patch_pca(vit, Xtr)
if cfg["pos_init"] == "sincos":
    init_pos_sincos(vit)
bv, log = train(vit, cfg["epochs"], cfg["lr"], kd_model)
ru = resource.getrusage(resource.RUSAGE_SELF)
res.update(vit_val=bv, vit_test=acc(vit, sp.test), val_log=log, wall=round(time.time() - t0, 1),
           cpu=round(ru.ru_utime + ru.ru_stime, 1))
print("RESULT", json.dumps(res), flush=True)
