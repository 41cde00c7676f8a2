"""Demo teacher experiment (docs/demo-results.md, eighth try): a CCT teacher (convolutional tokenizer) trained
alone with train_teacher on MNIST-5k, the demo's light recipe.
    python scripts/demo_cct_teacher_experiment.py '{"data_seed": 1}'
    python scripts/demo_cct_teacher_experiment.py '{"chans": [8, 16]}'
prints the FLOPs and one RESULT line of JSON (test %, best val %, val % every third epoch, wall and CPU s).
"""
import json, sys, time, resource
import torch
from devit_ext import data as D
from devit_ext.cct import CCT, flops, make_config, seq_len
from devit_ext.teacher import train_teacher
from devit_ext.evaluate import accuracy

c = dict(dim=128, depth=4, heads=4, mlp=2.0, convs=3, chans=[16, 32], k=3, epochs=30, bs=128, lr=2e-3,
         shift=2, seed=0, data_seed=0, threads=1, pos="learnable", dp=0.1, ad=0.1, wd=0.05, warm=None)
c.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
torch.set_num_threads(c["threads"])
sp = D.mnist5k(seed=c["data_seed"])
cfg = make_config(embed_dim=c["dim"], depth=c["depth"], num_heads=c["heads"], mlp_ratio=c["mlp"], kernel_size=c["k"],
                  n_conv_layers=c["convs"], img_size=28, in_chans=1, num_classes=10, positional_embedding=c["pos"],
                  attn_drop_rate=c["ad"], drop_path_rate=c["dp"], mean=sp.mean, std=sp.std, conv_channels=c["chans"])
torch.manual_seed(c["seed"])
m = CCT(cfg)
print("flops", flops(cfg), "tokens", seq_len(cfg), flush=True)
t0 = time.time()
kw = {} if c["warm"] is None else {"warmup_epochs": c["warm"]}
m, hist = train_teacher(sp.train, sp.val, teacher=m, epochs=c["epochs"], batch_size=c["bs"], lr=c["lr"], shift=c["shift"],
                        weight_decay=c["wd"], seed=c["seed"], progress=False, **kw)
wall = time.time() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
te = accuracy(m.eval(), sp.test)
va = [round(h.get("val_acc", 0) * 100, 1) for h in hist]
print("RESULT", json.dumps(dict(c=c, test=round(100 * te, 2), best_val=max(va), val=va[::3], wall=round(wall), cpu=round(ru.ru_utime + ru.ru_stime))), flush=True)
